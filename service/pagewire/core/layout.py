"""Region layouts: the handoff JSON (Firecracker's GuestRegionUffdMapping) and its checks."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

SYSTEM_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def _user_space_end() -> int:
    """End of user space: 1 << 47 with 4-level paging, 1 << 56 with 5-level (la57)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return 1 << 47
    return 1 << 56 if " la57" in flags else 1 << 47


USER_SPACE_END = _user_space_end()


def huge_page_sizes() -> set[int]:
    root = Path("/sys/kernel/mm/hugepages")
    sizes = set()
    if root.is_dir():
        for entry in root.iterdir():
            if entry.name.startswith("hugepages-") and entry.name.endswith("kB"):
                sizes.add(int(entry.name[len("hugepages-") : -2]) * 1024)
    return sizes or {2 << 20}


@dataclass(frozen=True)
class Region:
    base: int
    size: int
    offset: int
    page_size: int

    @property
    def end(self) -> int:
        return self.base + self.size

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.base, self.size, self.offset, self.page_size)

    def to_json(self) -> dict[str, int]:
        # Firecracker sends both keys, each in bytes
        return {
            "base_host_virt_addr": self.base,
            "size": self.size,
            "offset": self.offset,
            "page_size": self.page_size,
            "page_size_kib": self.page_size,
        }


class LayoutError(ValueError):
    """A handoff layout defect; code names it."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Limits:
    max_regions: int = 256
    max_bytes: int = 1 << 40
    image_size: int | None = None


def _int_field(item: dict[str, object], key: str, index: int) -> int:
    value = item.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise LayoutError("invalid_region", f"region {index}: {key} must be a non-negative integer")
    return value


def _page_size(item: dict[str, object], index: int) -> int:
    sizes = [item[k] for k in ("page_size", "page_size_kib") if k in item]
    if not sizes:
        raise LayoutError("invalid_region", f"region {index}: page_size missing")
    for value in sizes:
        if not isinstance(value, int) or isinstance(value, bool):
            raise LayoutError("invalid_region", f"region {index}: page_size must be an integer")
    if len(set(sizes)) > 1:
        raise LayoutError(
            "page_size_mismatch", f"region {index}: page_size and page_size_kib disagree"
        )
    page_size = int(sizes[0])  # type: ignore[call-overload]
    if page_size != SYSTEM_PAGE_SIZE and page_size not in huge_page_sizes():
        raise LayoutError(
            "bad_page_size", f"region {index}: page size {page_size} is not a supported page size"
        )
    return page_size


def parse_region(item: object, index: int) -> Region:
    if not isinstance(item, dict):
        raise LayoutError("invalid_region", f"region {index} is not an object")
    base = _int_field(item, "base_host_virt_addr", index)
    size = _int_field(item, "size", index)
    offset = _int_field(item, "offset", index)
    page_size = _page_size(item, index)
    if size == 0:
        raise LayoutError("invalid_region", f"region {index}: size is zero")
    if base % page_size or size % page_size or offset % page_size:
        raise LayoutError("unaligned", f"region {index} is not aligned to its page size")
    if base == 0 or base + size > USER_SPACE_END:
        raise LayoutError("kernel_address", f"region {index} is outside user space")
    return Region(base, size, offset, page_size)


def check_layout(regions: list[Region], limits: Limits) -> None:
    if not regions:
        raise LayoutError("empty_layout", "the region list is empty")
    if len(regions) > limits.max_regions:
        raise LayoutError(
            "too_many_regions", f"{len(regions)} regions, at most {limits.max_regions}"
        )
    total = sum(r.size for r in regions)
    if total > limits.max_bytes:
        raise LayoutError("too_large", f"{total} bytes in regions, at most {limits.max_bytes}")
    ordered = sorted(regions, key=lambda r: r.base)
    for before, after in zip(ordered, ordered[1:], strict=False):
        if after.base < before.end:
            raise LayoutError("overlapping_regions", "regions overlap")
    if limits.image_size is not None:
        for i, r in enumerate(regions):
            if r.offset + r.size > limits.image_size:
                raise LayoutError(
                    "beyond_image", f"region {i} ends beyond the image ({limits.image_size} bytes)"
                )


def parse_layout(body: bytes, limits: Limits) -> list[Region]:
    """Parse and check the handoff JSON array (unknown keys ignored)."""
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LayoutError("invalid_json", f"the region layout is not valid JSON: {exc}") from exc
    if not isinstance(data, list):
        raise LayoutError("invalid_json", "the region layout must be a JSON array")
    if len(data) > limits.max_regions:
        raise LayoutError("too_many_regions", f"{len(data)} regions, at most {limits.max_regions}")
    regions = [parse_region(item, i) for i, item in enumerate(data)]
    check_layout(regions, limits)
    return regions
