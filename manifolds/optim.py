"""An optimizer wrapper that projects gradients or steps of chosen parameters.

Low-rank adapters trained on a sequence of tasks are often constrained to a
subspace per layer. For a LoRA pair with A of shape (r, d_in) and B of shape
(d_out, r), the update of A is projected on the right (A ↦ A P). The update
of B is projected on the left (B ↦ P B). :class:`ProjectedOptimizer` does this for any
``torch.optim.Optimizer``, including geoopt's Riemannian ones. It projects
either the gradient before the inner step or the step that the inner optimizer took.
"""

import dataclasses
import logging
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch

from ._numerics import compute_dtype

__all__ = ["BasisProjection", "MatrixProjection", "ProjectedOptimizer"]

logger = logging.getLogger(__name__)

_SIDES = ("left", "right")
_MODES = ("grad", "step")


def _check_side(side: str) -> None:
    if side not in _SIDES:
        raise ValueError(f"side must be 'left' (P @ X) or 'right' (X @ P), got {side!r}")


def _acted_dimension(shape: torch.Size, side: str) -> int:
    # The dimension of X that P @ X or X @ P contracts. A vector is its own column or row.
    if len(shape) == 1:
        return shape[0]
    return shape[-2] if side == "left" else shape[-1]


class MatrixProjection:
    """Linear map X ↦ P @ X (``side="left"``) or X ↦ X @ P (``side="right"``).

    P can be any square matrix, for example I − U Uᵀ to remove a subspace.
    The product is computed in float32 or wider and cast back to X's dtype.

    Args:
        matrix: Square matrix P of shape (n, n).
        side: "left" for P @ X, "right" for X @ P.

    Raises:
        ValueError: If P is not square or finite, or ``side`` is invalid.
    """

    kind = "matrix"

    def __init__(self, matrix: torch.Tensor, side: str = "left") -> None:
        _check_side(side)
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"matrix must be square with shape (n, n), got {tuple(matrix.shape)}")
        if not torch.isfinite(matrix).all():
            raise ValueError("matrix contains NaN or inf")
        self.tensor = matrix.detach()
        self.side = side

    def check_shape(self, shape: torch.Size) -> None:
        """Raise ValueError unless the map applies to a tensor of this shape."""
        size = self.tensor.shape[0]
        if _acted_dimension(shape, self.side) != size:
            raise ValueError(
                f"a {self.side} projection of size {size} does not fit a parameter of shape {tuple(shape)}"
            )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the map to x and return the result in x's dtype."""
        dtype = compute_dtype(x.dtype, self.tensor.dtype)
        matrix = self.tensor.to(device=x.device, dtype=dtype)
        x_wide = x.to(dtype)
        if self.side == "left":
            result = matrix @ x_wide
        else:
            result = x_wide @ matrix
        return result.to(x.dtype)

    def __repr__(self) -> str:
        return f"MatrixProjection(shape={tuple(self.tensor.shape)}, side={self.side!r})"


class BasisProjection:
    """Orthogonal projection onto span(U): X ↦ U Uᵀ X (left) or X ↦ X U Uᵀ (right).

    The product is formed as U (Uᵀ X) or (X U) Uᵀ, so the n × n matrix U Uᵀ
    is never built.

    Args:
        basis: Orthonormal basis U of shape (n, k).
        side: "left" for U Uᵀ X, "right" for X U Uᵀ.

    Raises:
        ValueError: If U is not 2-D, not finite, or its columns are not
            orthonormal to within sqrt(eps) of its compute dtype.
    """

    kind = "basis"

    def __init__(self, basis: torch.Tensor, side: str = "left") -> None:
        _check_side(side)
        if basis.ndim != 2 or basis.shape[1] > basis.shape[0]:
            raise ValueError(f"basis must have shape (n, k) with k ≤ n, got {tuple(basis.shape)}")
        if not torch.isfinite(basis).all():
            raise ValueError("basis contains NaN or inf")
        dtype = compute_dtype(basis.dtype)
        wide = basis.detach().to(dtype)
        gram_error = (wide.T @ wide - torch.eye(wide.shape[1], dtype=dtype, device=wide.device)).abs().max()
        tolerance = torch.finfo(dtype).eps ** 0.5
        if gram_error > tolerance:
            raise ValueError(
                f"basis columns must be orthonormal, but max |UᵀU − I| is {gram_error.item():.3g} "
                f"(tolerance {tolerance:.3g}); orthonormalise with torch.linalg.qr, or use MatrixProjection"
            )
        self.tensor = basis.detach()
        self.side = side

    def check_shape(self, shape: torch.Size) -> None:
        """Raise ValueError unless the projection applies to a tensor of this shape."""
        size = self.tensor.shape[0]
        if _acted_dimension(shape, self.side) != size:
            raise ValueError(
                f"a {self.side} projection onto a basis of {size} rows does not fit a parameter "
                f"of shape {tuple(shape)}"
            )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Project x onto span(U) on the chosen side and return it in x's dtype."""
        dtype = compute_dtype(x.dtype, self.tensor.dtype)
        basis = self.tensor.to(device=x.device, dtype=dtype)
        x_wide = x.to(dtype)
        if self.side == "left":
            result = basis @ (basis.T @ x_wide)
        else:
            result = (x_wide @ basis) @ basis.T
        return result.to(x.dtype)

    def __repr__(self) -> str:
        return f"BasisProjection(shape={tuple(self.tensor.shape)}, side={self.side!r})"


Projector = Union[MatrixProjection, BasisProjection, Callable[[torch.Tensor], torch.Tensor]]


@dataclasses.dataclass
class _Registration:
    param: torch.Tensor
    projector: Projector
    mode: str


def _manifold_of(param: torch.Tensor):
    # geoopt.ManifoldParameter and ManifoldTensor carry a `manifold` attribute.
    return getattr(param, "manifold", None)


def _non_finite_count(tensor: torch.Tensor) -> torch.Tensor:
    return (~torch.isfinite(tensor)).sum()


class ProjectedOptimizer(torch.optim.Optimizer):
    """Wrap an optimizer and project the gradient or the step of registered parameters.

    Modes, chosen per parameter with :meth:`register`:

    * ``"grad"``: before the inner step, the gradient g is replaced by
      projector(g). For a ``geoopt.ManifoldParameter`` this is the Euclidean
      gradient. The inner Riemannian optimizer then applies ``egrad2rgrad``.
    * ``"step"``: the parameter is saved before the inner step, and afterwards
      the step Δ = new − old is replaced by projector(Δ), so the parameter
      becomes old + projector(Δ). For a parameter with a geoopt manifold the
      step is first projected onto the tangent space at old (``proju``), then
      through the projector and ``proju`` again, and the parameter becomes
      ``manifold.retr(old, step)``, which keeps it on the manifold. The inner
      step on a manifold is a retraction, so Δ is a chord. For the projection
      retraction projx(x + u) its tangent part is u/sqrt(1 + ‖u‖²), slightly
      shorter than the inner step u.

    The inner optimizer's state (for example Adam's moments) is not projected.
    ``param_groups``, ``state``, ``defaults``, ``zero_grad`` and
    ``add_param_group`` pass through, so LR schedulers and gradient scalers work
    on the wrapper. A closure passed to :meth:`step` is evaluated once before the
    gradients are projected, so optimizers that re-evaluate closures, such as
    LBFGS, are not supported.

    Args:
        optimizer: The inner optimizer.

    Raises:
        TypeError: If ``optimizer`` is not a ``torch.optim.Optimizer``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self._registrations: Dict[int, _Registration] = {}
        # Optimizer.__init__ would re-add the inner param groups, so only the
        # hook tables and the step wrapper that its methods rely on are set up.
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()

    @property
    def param_groups(self) -> List[Dict[str, Any]]:
        """The inner optimizer's parameter groups."""
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: List[Dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Dict[torch.Tensor, Any]:
        """The inner optimizer's per-parameter state."""
        return self.optimizer.state

    @state.setter
    def state(self, value: Dict[torch.Tensor, Any]) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> Dict[str, Any]:
        """The inner optimizer's default hyperparameters."""
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: Dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def _params_in_order(self) -> List[torch.Tensor]:
        return [param for group in self.param_groups for param in group["params"]]

    def register(self, param: torch.Tensor, projector: Projector, *, mode: str = "grad") -> None:
        """Set the projector of a parameter, replacing any earlier one.

        Args:
            param: A parameter of the inner optimizer.
            projector: A :class:`MatrixProjection`, a :class:`BasisProjection`, or
                any callable that maps a tensor of the parameter's shape to one of
                the same shape.
            mode: "grad" to project the gradient, "step" to project the step.

        Raises:
            ValueError: If the parameter is not in the inner optimizer, the mode
                is invalid or the projection does not fit the parameter's shape.
            TypeError: If ``projector`` is a tensor or not callable.
        """
        if mode not in _MODES:
            raise ValueError(f"mode must be 'grad' or 'step', got {mode!r}")
        if not any(param is candidate for candidate in self._params_in_order()):
            raise ValueError(
                f"parameter of shape {tuple(param.shape)} is not in the wrapped optimizer's param_groups; "
                "add it with add_param_group() first"
            )
        if isinstance(projector, torch.Tensor):
            raise TypeError(
                "a bare tensor is ambiguous as a projector; wrap it in MatrixProjection(P, side=...) "
                "or BasisProjection(U, side=...)"
            )
        if not callable(projector):
            raise TypeError(f"projector must be callable, got {type(projector).__name__}")
        if isinstance(projector, (MatrixProjection, BasisProjection)):
            projector.check_shape(param.shape)
        self._registrations[id(param)] = _Registration(param=param, projector=projector, mode=mode)

    def unregister(self, param: torch.Tensor) -> None:
        """Remove the projector of a parameter.

        Raises:
            ValueError: If the parameter has no projector.
        """
        if self._registrations.pop(id(param), None) is None:
            raise ValueError(f"parameter of shape {tuple(param.shape)} has no registered projector")

    def clear(self) -> None:
        """Remove all projectors."""
        self._registrations.clear()

    def registered(self, param: torch.Tensor) -> Optional[Tuple[Projector, str]]:
        """Return the (projector, mode) of a parameter, or None if it has none."""
        registration = self._registrations.get(id(param))
        if registration is None or registration.param is not param:
            return None
        return registration.projector, registration.mode

    def _active(self, mode: str) -> List[Tuple[int, _Registration]]:
        # Registrations whose parameter is still in the param groups, with its index.
        active = []
        for index, param in enumerate(self._params_in_order()):
            registration = self._registrations.get(id(param))
            if registration is not None and registration.param is param and registration.mode == mode:
                active.append((index, registration))
        return active

    @staticmethod
    def _raise_if_non_finite(
        checks: List[Tuple[int, torch.Tensor, str, torch.Tensor, torch.Tensor]],
    ) -> None:
        # checks: (index, param, what, input, projected). One synchronisation for all.
        if not checks:
            return
        counts = torch.stack(
            [torch.stack([_non_finite_count(projected), _non_finite_count(source)]) for *_, source, projected in checks]
        ).tolist()
        for (index, param, what, _, _), (bad, bad_input) in zip(checks, counts):
            if bad:
                raise FloatingPointError(
                    f"projected {what} of parameter #{index} (shape {tuple(param.shape)}) has {bad} non-finite "
                    f"values, and the {what} before projection had {bad_input}; check the projector, "
                    "the loss and the learning rate"
                )

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Project registered gradients, run the inner step, then project registered steps.

        Args:
            closure: Optional callable that recomputes the loss and gradients.
                It is evaluated once, before the projection.

        Returns:
            The closure's loss, or None.

        Raises:
            FloatingPointError: If a projected gradient or step contains NaN or
                inf. Gradients are checked before the inner step, so nothing has
                changed. For steps, the parameters in step mode are restored to
                their values before the step, but the inner optimizer's state
                has already advanced.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        gradient_checks = []
        for index, registration in self._active("grad"):
            param = registration.param
            if param.grad is None:
                continue
            if param.grad.is_sparse:
                raise ValueError(
                    f"parameter #{index} (shape {tuple(param.shape)}) has a sparse gradient, which cannot be "
                    "projected; unregister it or make its gradient dense"
                )
            projected = registration.projector(param.grad)
            if projected.shape != param.grad.shape:
                raise ValueError(
                    f"projector of parameter #{index} returned shape {tuple(projected.shape)} "
                    f"for a gradient of shape {tuple(param.grad.shape)}"
                )
            gradient_checks.append((index, param, "gradient", param.grad, projected))
        self._raise_if_non_finite(gradient_checks)
        for _, param, _, _, projected in gradient_checks:
            param.grad.copy_(projected)

        step_registrations = self._active("step")
        before = [registration.param.detach().clone() for _, registration in step_registrations]

        self.optimizer.step()

        step_checks = []
        updates = []
        for (index, registration), old in zip(step_registrations, before):
            param = registration.param
            new = self._project_step(registration, old, param.detach())
            if new.shape != param.shape:
                raise ValueError(
                    f"projector of parameter #{index} returned shape {tuple(new.shape)} "
                    f"for a step of shape {tuple(param.shape)}"
                )
            step_checks.append((index, param, "step", param.detach() - old, new))
            updates.append((param, new))
        try:
            self._raise_if_non_finite(step_checks)
        except FloatingPointError:
            for (_, registration), old in zip(step_registrations, before):
                registration.param.copy_(old)
            raise
        for param, new in updates:
            param.copy_(new)
        return loss

    @staticmethod
    def _project_step(registration: _Registration, old: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        step = current - old
        manifold = _manifold_of(registration.param)
        if manifold is None:
            return old + registration.projector(step)
        tangent = manifold.proju(old, step)
        projected = manifold.proju(old, registration.projector(tangent))
        return manifold.retr(old, projected)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients of all parameters, through the inner optimizer."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a parameter group to the inner optimizer."""
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> Dict[str, Any]:
        """Return the inner optimizer's state and the registered projectors.

        Projectors are keyed by the parameter's index in param_groups order.
        Matrix and basis projections store their tensor. Other callables are
        stored by kind only and must be registered again before
        :meth:`load_state_dict`.
        """
        active = sorted(self._active("grad") + self._active("step"), key=lambda item: item[0])
        projectors = {}
        for index, registration in active:
            projector = registration.projector
            if isinstance(projector, (MatrixProjection, BasisProjection)):
                entry = {"kind": projector.kind, "side": projector.side, "tensor": projector.tensor.clone()}
            else:
                entry = {"kind": "callable", "side": None, "tensor": None}
            entry["mode"] = registration.mode
            projectors[index] = entry
        return {"optimizer": self.optimizer.state_dict(), "projectors": projectors}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load the inner optimizer's state and replace all projectors.

        Entries of kind "callable" keep the callable currently registered for
        that parameter, so register it before loading.

        Args:
            state_dict: A dict returned by :meth:`state_dict`.

        Raises:
            ValueError: If the dict is malformed, an index is out of range, or a
                callable entry has no callable registered.
        """
        if set(state_dict) != {"optimizer", "projectors"}:
            raise ValueError(
                f"state_dict must have keys 'optimizer' and 'projectors', got {sorted(state_dict)}; "
                "was it saved by ProjectedOptimizer.state_dict()?"
            )
        params = self._params_in_order()
        registrations: Dict[int, _Registration] = {}
        for index, entry in state_dict["projectors"].items():
            index = int(index)
            if not 0 <= index < len(params):
                raise ValueError(f"projector index {index} is out of range for {len(params)} parameters")
            param = params[index]
            if entry["kind"] == "matrix":
                projector = MatrixProjection(entry["tensor"].to(param.device), side=entry["side"])
            elif entry["kind"] == "basis":
                projector = BasisProjection(entry["tensor"].to(param.device), side=entry["side"])
            elif entry["kind"] == "callable":
                current = self.registered(param)
                if current is None:
                    raise ValueError(
                        f"parameter #{index} (shape {tuple(param.shape)}) had a callable projector, which "
                        "cannot be saved; register it again before load_state_dict()"
                    )
                projector = current[0]
            else:
                raise ValueError(
                    f"unknown projector kind {entry['kind']!r} for parameter #{index}; "
                    "expected 'matrix', 'basis' or 'callable'"
                )
            if isinstance(projector, (MatrixProjection, BasisProjection)):
                projector.check_shape(param.shape)
            if entry["mode"] not in _MODES:
                raise ValueError(f"unknown mode {entry['mode']!r} for parameter #{index}; expected 'grad' or 'step'")
            registrations[id(param)] = _Registration(param=param, projector=projector, mode=entry["mode"])

        self.optimizer.load_state_dict(state_dict["optimizer"])
        self._registrations = registrations
        logger.debug("loaded %d projectors", len(registrations))

    def __repr__(self) -> str:
        return f"ProjectedOptimizer({self.optimizer!r}, projectors={len(self._registrations)})"
