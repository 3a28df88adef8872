"""Riemannian tools for features on the unit sphere, built on torch and geoopt.

The package depends only on torch, geoopt and the standard library, so it can
be copied into other projects on its own.

* :class:`Sphere`: geoopt manifold of unit vectors, accurate near 0 and π.
* :class:`TangentPCA`: streaming PCA of tangent vectors.
* :func:`spherical_kmeans`: k-means with geodesic distances.
* :class:`TangentSubspaceProjector` and :func:`project_tangent`: gradient
  projection onto tangent spaces and transported subspaces.
* :class:`ProjectedOptimizer`: optimizer wrapper that projects gradients or steps.
"""

from .kmeans import SphericalKMeansResult, spherical_kmeans
from .optim import BasisProjection, MatrixProjection, ProjectedOptimizer
from .projector import TangentSubspaceProjector, project_tangent, projection_ratio
from .sphere import Sphere
from .tangent_pca import TangentPCA, TangentPCAResult

__all__ = [
    "BasisProjection",
    "MatrixProjection",
    "ProjectedOptimizer",
    "Sphere",
    "SphericalKMeansResult",
    "TangentPCA",
    "TangentPCAResult",
    "TangentSubspaceProjector",
    "project_tangent",
    "projection_ratio",
    "spherical_kmeans",
]
