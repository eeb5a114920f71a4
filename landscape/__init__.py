"""landscape: analysis of the minima that training reaches.

The Hessian spectrum, sharpness measures and loss surfaces of ../shared/SPEC.md sections 2-5 land here
as the modules ``objective``, ``hessian``, ``lanczos``, ``sharpness``, ``directions`` and ``surface``.
"""

__all__: list[str] = []
