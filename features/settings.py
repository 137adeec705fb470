"""What decides a cache's content: the one settings record that shards and finished files are tied to."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

PRECISIONS = ("fp32", "bf16", "fp16")  # compute precision of the backbone (the head always runs in fp32)
DTYPES = ("float32", "float16")  # storage dtype of cached features


@dataclass(frozen=True)
class CacheSettings:
    """Everything that decides a cache's content. Two caches with equal settings hold equal data.

    Which layers a file holds is not a setting: a file with equal settings can gain a layer.
    """

    backbone: str  # "alexnet"
    weights_fingerprint: str
    preprocess: str  # Preprocess.to_json()
    dtype: str  # "float32" or "float16", as stored
    precision: str  # compute precision: fp32, bf16 or fp16
    dataset_signature: str  # sha256 of the class order and the split's (path, label) list
    files_signature: str | None = None  # sha256 of each image's path, size and mtime
    layer: str = field(default="fc7", compare=False)  # the layer ``features`` links to (see features.writer)
    # sha256 of each image's path, size, mtime, inode and ctime: a swap of two names, or an edit with the mtime
    # kept, changes it. Files made before it was recorded (None) are compared on ``files_signature`` alone.
    files_identity: str | None = field(default=None, compare=False)

    def differences(self, other: "CacheSettings") -> list[str]:
        """The fields in which ``other`` (this run's) differs from these (a file's recorded settings)."""
        mine, theirs = asdict(self), asdict(other)
        changed = [f.name for f in fields(self) if f.compare and mine[f.name] != theirs[f.name]]
        if self.files_identity is not None and self.files_identity != other.files_identity:
            changed.append("files_identity")
        return changed

    @classmethod
    def from_attrs(cls, attrs) -> "CacheSettings":
        """The settings a file records (a file from before a field was added records None for it)."""
        return cls(**{f.name: attrs[f.name] if f.name in attrs else f.default for f in fields(cls)})
