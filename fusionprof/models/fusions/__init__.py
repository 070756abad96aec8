"""One file per fusion method; each registers itself with ``@register_fusion``."""
