"""`ModelConfig`: the hyper-parameters of an SE3Set network, with named presets."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from ..fragment import FragmentSettings

_PRESETS: dict[str, dict[str, Any]] = {
    # The published MD17/MD22 setting (method notes §3.2): 6 blocks, 128x0e+64x1o+32x2e, 4 heads,
    # FFN 384x0e+192x1o+96x2e, 32 exp-normal basis functions, 512x0e last node output.
    "paper": dict(
        irreps_node="128x0e+64x1o+32x2e", num_blocks=6, num_heads=4, irreps_head="32x0e+16x1o+8x2e",
        attn_scalars=32, irreps_ffn="384x0e+192x1o+96x2e", num_basis=32, radial_hidden=64,
        head_dim=512,
    ),
    # CPU-friendly: same structure, about 1/4 of the width, 3 blocks.
    "small": dict(
        irreps_node="64x0e+16x1o+8x2e", num_blocks=3, num_heads=4, irreps_head="16x0e+4x1o+2x2e",
        attn_scalars=16, irreps_ffn="128x0e+32x1o+16x2e", num_basis=16, radial_hidden=32,
        head_dim=64,
    ),
    # For tests: tiny but every path exercised (l = 0, 1, 2; several heads; two blocks).
    "tiny": dict(
        irreps_node="8x0e+4x1o+2x2e", num_blocks=2, num_heads=2, irreps_head="4x0e+2x1o+1x2e",
        attn_scalars=4, irreps_ffn="16x0e+4x1o+2x2e", num_basis=8, radial_hidden=8,
        head_dim=16,
    ),
}


@dataclass
class ModelConfig:
    """Architecture of an SE3Set network. Lengths in Å.

    ``elements`` are the atomic numbers the model knows (one-hot order). ``max_radius`` is the
    cutoff of the radial basis inside a hyperedge (members farther apart still interact, with a
    distance-independent radial weight, as in the published model). ``fragment`` holds the
    fragmentation settings, which are part of the model: a model must be fed the hypergraphs it
    was trained on.
    """

    elements: list[int] = field(default_factory=lambda: [1, 6, 7, 8])
    irreps_node: str = "128x0e+64x1o+32x2e"
    num_blocks: int = 6
    num_heads: int = 4
    irreps_head: str = "32x0e+16x1o+8x2e"
    attn_scalars: int = 32
    irreps_ffn: str = "384x0e+192x1o+96x2e"
    lmax: int = 2
    num_basis: int = 32
    radial_hidden: int = 64
    max_radius: float = 9.0
    head_dim: int = 512
    fragment: FragmentSettings = field(default_factory=FragmentSettings)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in _PRESETS:
            raise ValueError(f"unknown model preset {name!r}; available: {', '.join(_PRESETS)}")
        return replace(cls(**_PRESETS[name]), **overrides)

    @staticmethod
    def preset_names() -> list[str]:
        return list(_PRESETS)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["fragment"] = self.fragment.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"model config has unknown fields {sorted(unknown)}")
        d = dict(d)
        if "fragment" in d and isinstance(d["fragment"], dict):
            d["fragment"] = FragmentSettings.from_dict(d["fragment"])
        d["elements"] = [int(z) for z in d.get("elements", [])]
        return cls(**d)
