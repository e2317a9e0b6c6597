"""The Lark grammar of attnlang's expressions (``attnlang.lark``), shipped in the wheel as ``attnlang.grammar``."""
