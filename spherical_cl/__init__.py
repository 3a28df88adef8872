"""spherical-cl: exemplar-free class-incremental learning on the hypersphere with LoRA subtraction."""

__version__ = "0.1.0"
