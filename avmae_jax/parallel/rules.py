"""The mesh axes and the logical-axis rules, as data (the one place that maps names to axes).

The mesh has three axes: `data` (pure data parallelism: replicated parameters),
`fsdp` (data parallelism with parameters and optimizer state sharded, ZeRO-3 style)
and `tensor` (Megatron-style splitting of attention heads and the MLP). The batch is
split over data x fsdp. Models name their axes logically (models/layers.py); `RULES`
maps those names onto mesh axes.
"""

from typing import Any

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# (logical name, mesh axis or axes or None). Parameter names first, then activations.
RULES: tuple[tuple[str, Any], ...] = (
    ("embed", "fsdp"),
    ("decoder_embed", "fsdp"),
    ("mlp", "tensor"),
    ("qkv", "tensor"),
    ("heads_merged", "tensor"),
    ("classes", None),
    ("layers", None),  # the stacked axis of scanned blocks (models/stacking.py)
    ("patch_out", None),
    ("length", None),
    ("norm", None),
    ("patch_h", None),
    ("patch_w", None),
    ("channels", None),
    ("act_batch", BATCH_AXES),
    ("act_length", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv", None),
)
