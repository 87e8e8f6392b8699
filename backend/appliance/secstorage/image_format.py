"""What a template file really is: QCOW2 (header, virtual size, refusals), ISO 9660 or RAW."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import StrEnum

from backend.appliance.secstorage.failure import Reason, TransferFailed

HEAD_BYTES = 64 * 1024  # enough for the QCOW2 header and backing name, and the ISO 9660 signature
QCOW2_MAGIC = b"QFI\xfb"
ISO9660_SIGNATURE = b"CD001"
ISO9660_OFFSET = 32769  # byte 1 of the first volume descriptor, sector 16
# QCOW2 incompatible feature bits (qemu docs/interop/qcow2.txt)
_DIRTY, _CORRUPT, _EXTERNAL_DATA, _COMPRESSION_TYPE, _EXTENDED_L2 = (1 << i for i in range(5))
_KNOWN_INCOMPATIBLE = _DIRTY | _CORRUPT | _EXTERNAL_DATA | _COMPRESSION_TYPE | _EXTENDED_L2


class ImageFormat(StrEnum):
    """The formats a template can be registered in (CloudStack's names)."""

    QCOW2 = "QCOW2"
    RAW = "RAW"
    ISO = "ISO"

    @property
    def extension(self) -> str:
        return self.value.lower()


@dataclass(frozen=True)
class ImageInfo:
    """What the bytes are, and the size of the disk they describe (the file size for RAW and ISO)."""

    format: ImageFormat
    virtual_size: int | None


def inspect_head(head: bytes, file_size: int | None) -> ImageInfo:
    """Detect the format from the file's first bytes; refuse QCOW2 images that are unsafe or broken.

    `file_size` is None while the download is still running (early check); RAW and ISO then have
    no virtual size yet. Raises TransferFailed (backing_file, corrupt or format).
    """
    if head.startswith(QCOW2_MAGIC):
        return ImageInfo(ImageFormat.QCOW2, _qcow2_virtual_size(head))
    if head[ISO9660_OFFSET : ISO9660_OFFSET + len(ISO9660_SIGNATURE)] == ISO9660_SIGNATURE:
        return ImageInfo(ImageFormat.ISO, file_size)
    return ImageInfo(ImageFormat.RAW, file_size)


def check_declared(declared: ImageFormat, info: ImageInfo) -> None:
    """Refuse a file whose bytes are not the declared format (a hybrid ISO may be registered as RAW)."""
    if declared == info.format:
        return
    if declared == ImageFormat.RAW and info.format == ImageFormat.ISO:
        return
    what = {
        ImageFormat.QCOW2: "a QCOW2 image",
        ImageFormat.ISO: "an ISO 9660 image",
        ImageFormat.RAW: "neither QCOW2 nor ISO 9660 (RAW)",
    }[info.format]
    raise TransferFailed(
        Reason.FORMAT, f"the template was registered as {declared.value} but the file is {what}"
    )


def _qcow2_virtual_size(head: bytes) -> int:
    """Parse the QCOW2 header (v2 or v3) and return the virtual size, refusing what qemu should not open."""
    if len(head) < 72:
        raise TransferFailed(Reason.FORMAT, "the QCOW2 header is truncated")
    version, backing_offset, backing_size, cluster_bits, size = struct.unpack_from(
        ">IQIIQ", head, 4
    )
    if version not in (2, 3):
        raise TransferFailed(Reason.FORMAT, f"QCOW2 version {version} is not supported")
    if backing_offset != 0 or backing_size != 0:
        name = _printable(head[backing_offset : backing_offset + min(backing_size, 1023)])
        shown = f" ({name!r})" if name else ""
        raise TransferFailed(
            Reason.BACKING_FILE,
            f"the QCOW2 image has a backing file{shown}; a template must be self-contained "
            f"(flatten it with `qemu-img convert -O qcow2`)",
        )
    if not 9 <= cluster_bits <= 21:
        raise TransferFailed(Reason.FORMAT, f"the QCOW2 cluster size 2^{cluster_bits} is invalid")
    if version == 3:
        if len(head) < 104:
            raise TransferFailed(Reason.FORMAT, "the QCOW2 v3 header is truncated")
        (incompatible,) = struct.unpack_from(">Q", head, 72)
        if incompatible & _CORRUPT:
            raise TransferFailed(
                Reason.CORRUPT,
                "the QCOW2 image is marked corrupt; repair it with `qemu-img check -r all` first",
            )
        if incompatible & _EXTERNAL_DATA:
            raise TransferFailed(
                Reason.BACKING_FILE,
                "the QCOW2 image keeps its data in an external file; a template must be "
                "self-contained (convert it with `qemu-img convert -O qcow2`)",
            )
        unknown = incompatible & ~_KNOWN_INCOMPATIBLE
        if unknown:
            raise TransferFailed(
                Reason.FORMAT, f"the QCOW2 image uses unknown incompatible features {unknown:#x}"
            )
    return int(size)


def _printable(raw: bytes) -> str:
    text = raw.decode("utf-8", errors="replace")
    return "".join(c if c.isprintable() else "?" for c in text)[:200]
