"""attnlang: attention variants as two short expressions, run on eager PyTorch, FlexAttention and FA4.

    import attnlang as al
    v = al.compile(score="score + slope[h] * (kv_idx - q_idx)", mask="q_idx >= kv_idx")
    out = v(q, k, v_, slope=slopes)

The language is LANGUAGE.md; the public API is API.md.
"""

from .errors import AttnLangError
from .variant import Variant, compile, from_config, reference

__all__ = ["AttnLangError", "Variant", "compile", "from_config", "reference", "__version__"]

__version__ = "0.1.0"
