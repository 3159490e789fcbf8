"""What an exported file (eomt.export) carries besides the network: written by the exporter, read by the
runtimes (eomt.inference.runtime). A leaf module: opening an exported file imports no Hydra, no model
construction and no hub client."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from eomt.errors import ConfigError

PT2_METADATA_FILE = "eomt_metadata.json"  # the .pt2 extra file holding it (ONNX: metadata_props)


@dataclass(frozen=True)
class ExportMetadata:
    """What an exported file needs to be run and read without any config."""

    task: str
    class_names: list[str]
    thing_classes: list[int]
    stuff_classes: list[int]
    img_size: list[int]  # H, W of the network input
    input_dtype: str  # float32 (in [0,1]) | uint8
    backbone: str
    model_name: str
    config_hash: str  # sha256 of the training run's resolved config (of the export config without one)
    config_source: str  # checkpoint | export

    def to_strings(self) -> dict[str, str]:
        """Flat string -> string (ONNX metadata_props); lists as JSON."""
        return {f"eomt.{k}": v if isinstance(v, str) else json.dumps(v) for k, v in asdict(self).items()}

    @classmethod
    def from_strings(cls, props: Mapping[str, str], source: str | Path) -> ExportMetadata:
        values = {k.removeprefix("eomt."): v for k, v in props.items() if k.startswith("eomt.")}
        missing = [f for f in cls.__dataclass_fields__ if f not in values]
        if missing:
            raise ConfigError(
                f"{source} has no EoMT metadata ({', '.join(missing)}): export it with python -m eomt.export"
            )
        fields = {}
        for name, field in cls.__dataclass_fields__.items():
            fields[name] = values[name] if field.type == "str" else json.loads(values[name])
        return cls(**fields)

    def check_matches(self, task: str, class_names: Sequence[str], source: str | Path) -> None:
        """One-line ConfigError when a config's task or classes differ from the file's."""
        if task != self.task:
            raise ConfigError(
                f"{source} is a {self.task} model but task={task}: drop task=... or pick another file"
            )
        if list(class_names) != self.class_names:
            raise ConfigError(
                f"{source} predicts {len(self.class_names)} classes ({', '.join(self.class_names[:4])}, ...) "
                f"that differ from the dataset config's {len(class_names)}: drop dataset=... or pick another file"
            )
