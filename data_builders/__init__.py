"""Data builders registered under the `openrlhf.data_builders` entry-point group.

A builder is a callable `build(config: dict, *, seed: int) -> BuiltDataset` (see
`emdpo_plugin.data.builders`); it validates its own config and returns format-v1 rows.
"""
