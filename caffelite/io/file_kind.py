"""What a file given as weights or solver state seems to be when it does not read as
one: the hint appended to the reader's error.  The usual causes are a download that
went wrong (a Git LFS pointer, an HTML page), an archive not yet unpacked, or two
file arguments swapped."""

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_LFS_POINTER = b"version https://git-lfs"

_COMPRESSED = (
    (b"\x1f\x8b", "gzip-compressed", "gunzip"),
    (b"BZh", "bzip2-compressed", "bunzip2"),
    (b"\xfd7zXZ\x00", "xz-compressed", "unxz"),
    (b"PK\x03\x04", "a zip archive", "unzip"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed", "unzstd"),
)


def read_head(path, size=4096):
    """The first ``size`` bytes of ``path`` (b"" when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            return f.read(size)
    except OSError:
        return b""


def download_or_archive_hint(head):
    """The hint for a file that no Caffe reader takes whatever its argument: a Git LFS
    pointer, an HTML page, a compressed file or archive, a tar file.  "" otherwise."""
    head = bytes(head)
    if head.startswith(_LFS_POINTER):
        return (" (this is a Git LFS pointer, a small text file standing for the real one: "
                "fetch it with 'git lfs pull')")
    if _is_html(head):
        return (" (this is an HTML page, not the file: a download that returned a web page "
                "-- a sign-in, quota or error page -- in its place)")
    for magic, what, tool in _COMPRESSED:
        if head.startswith(magic):
            return f" (this file is {what}: unpack it first, e.g. with {tool})"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return " (this is a tar archive: unpack it first, e.g. with tar xf)"
    return ""


def is_hdf5_file(path):
    """HDF5's H5Fis_hdf5 (Caffe's test for HDF5 weights): the signature at offset 0, or
    at 512, 1024, 2048 ... after a user block."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            offset = 0
            while offset + 8 <= size:
                f.seek(offset)
                if f.read(8) == HDF5_SIGNATURE:
                    return True
                offset = 512 if offset == 0 else 2 * offset
    except (OSError, TypeError, ValueError):
        pass
    return False


def is_hdf5(head):
    return bytes(head[:8]) == HDF5_SIGNATURE


def is_text(head):
    text = bytes(head).decode("utf-8", errors="ignore")    # (a character cut at the end)
    return bool(text) and all(ch.isprintable() or ch.isspace() for ch in text)


def _is_html(head):
    start = bytes(head[:512]).lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return start.startswith((b"<!doctype html", b"<html", b"<head", b"<?xml"))
