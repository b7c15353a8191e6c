"""Synthetic environments whose true rewards are known (what exact regret is measured against).

They live in the package, not with the data builders, because backends and reports need them
at run time: they rebuild one from a dataset's manifest (`environment` and `builder.config`, as
the builder recorded them), whatever name or `module:function` reference built the data.
"""
