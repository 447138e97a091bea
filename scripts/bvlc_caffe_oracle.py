#!/usr/bin/env python3
"""Unpack the real BVLC Caffe 1.0 (CPU) into a folder, as an oracle for development.

Debian 11 (bullseye) packaged BVLC Caffe (git 99bd997, 2018-08-21) with pycaffe for
Python 3.9.  This script downloads those packages and every shared library they need
from the Debian archive over https, checks each file's SHA-256 against the archive's
index, whose Release file's signature ``gpgv`` checks with Debian's archive keyring
(where the host has both; otherwise it says so), and unpacks them into ``DIR``
(``dpkg-deb -x``; nothing is installed system-wide):

    python3 scripts/bvlc_caffe_oracle.py /tmp/bvlc_caffe
    export CAFFELITE_BVLC_PYCAFFE=/tmp/bvlc_caffe/pycaffe39

``DIR/pycaffe39 script.py`` then runs ``import caffe`` with the real pycaffe, and
``. DIR/env.sh`` puts the real ``caffe``, ``upgrade_net_proto_text``,
``convert_imageset`` ... on PATH.  ``tests/test_bvlc_oracle.py`` compares caffelite with
it when ``CAFFELITE_BVLC_PYCAFFE`` is set, and is skipped otherwise.  ``DIR/site39``
holds CPython 3.9 wheels of skimage, scipy and pydot (from the package index, pinned by
hash) for ``tests/test_bvlc_pycaffe_api_oracle.py``.

BVLC Caffe of 2018 is not the DeepLab fork (based on BVLC of early 2016): the fork's own
layers are missing, and a few shared behaviours changed after 2016.  The test lists
only cases where the two agree.  Needs a Linux amd64 host with ``dpkg-deb`` and ``ldd``.
"""
import argparse
import gzip
import hashlib
import lzma
import os
import re
import shutil
import subprocess
import sys
import urllib.request

MIRROR = "https://deb.debian.org/debian/"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
SUITE = "dists/bullseye/main/"
CAFFE_PACKAGES = ["caffe", "libcaffe1", "python3-caffe"]
PYTHON_PACKAGES = ["python3.9-minimal", "libpython3.9-minimal", "libpython3.9-stdlib",
                   "python3-numpy", "python3-protobuf", "python3-six",
                   "libffi7"]       # ctypes, which scipy needs (site39 below)
# libblas.so.3 is an alternative in Debian; take OpenBLAS's threaded build.
SONAME_CHOICES = {"libblas.so.3": "libopenblas0-pthread"}
LIBRARY_DIRS = ["usr/lib/x86_64-linux-gnu", "usr/lib", "lib/x86_64-linux-gnu",
                "usr/lib/x86_64-linux-gnu/openblas-pthread"]
# CPython 3.9 wheels of what pycaffe's caffe.io, Classifier, Detector and caffe.draw
# use (skimage, scipy, pydot and their dependencies), of versions close to the fork's
# time that still have cp39 builds, pinned by hash.  They go to DIR/site39, which
# tests/test_bvlc_pycaffe_api_oracle.py puts first on the oracle's path; without them
# those tests skip.
SITE39_WHEELS = {
    "scikit-image==0.18.3": "bfa6eb04dc0b8773043f9994eccd8c517d713cd0f9e960dcb6754e19c1abceb1",
    "scipy==1.7.3": "5d1cc2c19afe3b5a546ede7e6a44ce1ff52e443d12b231823268019f608b9b12",
    "PyWavelets==1.1.1": "411e17ca6ed8cf5e18a7ca5ee06a91c25800cc6c58c77986202abf98d749273a",
    "pillow==8.4.0": "b8831cb7332eda5dc89b21a7bce7ef6ad305548820595033a4b03cf3091235ed",
    "imageio==2.9.0": "3604d751f03002e8e0e7650aa71d8d9148144a87daf17cb1f3228e80747f2e6b",
    "networkx==2.6.3": "80b6b89c77d1dfb64a4c7854981b60aeea6360ac02c6d4e4913319e0a313abef",
    "tifffile==2021.11.2": "2e0066f90e2dbeb3e6a287cfd78bafbd2f142fabbca4a76a8ff809573baf5ad5",
    "pydot==1.4.2": "66c98190c65b8d2e2382a441b4c0edfdb4f4c025ef9cb9874de478fb0793a451",
    "pyparsing==2.4.7": "ef9d7589ef3c200abe66653d3f1ab1033c3c419ae9b9bdb1240a85b024efc88b",
}
SITE39_PLATFORMS = ["manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_12_x86_64",
                    "manylinux2010_x86_64", "manylinux1_x86_64"]
# Without site39, pycaffe's caffe.io imports skimage and scipy at import time: stubs.
STUBS = {"skimage/__init__.py": "", "skimage/io/__init__.py": "def imread(*a, **k):\n"
         "    raise NotImplementedError('skimage is a stub in this oracle')\n",
         "skimage/transform/__init__.py": "def resize(*a, **k):\n"
         "    raise NotImplementedError('skimage is a stub in this oracle')\n",
         "scipy/__init__.py": "", "scipy/ndimage/__init__.py": "def zoom(*a, **k):\n"
         "    raise NotImplementedError('scipy is a stub in this oracle')\n"}


def fetch(url):
    with urllib.request.urlopen(url, timeout=120) as response:
        return response.read()


def checked(data, sha256, what):
    if hashlib.sha256(data).hexdigest() != sha256:
        sys.exit(f"{what}: SHA-256 differs from the archive's index")
    return data


def release(folder):
    """bullseye's Release file: its signed form (InRelease) checked with gpgv where the
    host has gpgv and Debian's archive keyring."""
    if not (shutil.which("gpgv") and os.path.exists(KEYRING)):
        print(f"note: no gpgv or no {KEYRING}: the Release file's signature is not checked")
        return fetch(MIRROR + "dists/bullseye/Release").decode()
    signed = os.path.join(folder, "InRelease")
    with open(signed, "wb") as f:
        f.write(fetch(MIRROR + "dists/bullseye/InRelease"))
    check = subprocess.run(["gpgv", "--keyring", KEYRING, "--output", "-", signed],
                           capture_output=True)
    if check.returncode != 0:
        sys.exit("bullseye's InRelease: the signature does not verify with Debian's "
                 "archive keyring:\n" + check.stderr.decode(errors="replace"))
    return check.stdout.decode()


def release_hashes(folder):
    """File under dists/bullseye/ -> SHA256, from the Release file."""
    text = release(folder)
    return dict((name, sha) for sha, name in
                re.findall(r"^ ([0-9a-f]{64})\s+\d+ (\S+)$", text, re.M))


def package_index(hashes):
    """Package name -> (Filename, SHA256), from bullseye main's Packages.xz."""
    packages = checked(fetch(MIRROR + SUITE + "binary-amd64/Packages.xz"),
                       hashes["main/binary-amd64/Packages.xz"], "Packages.xz")
    index = {}
    for stanza in lzma.decompress(packages).decode().split("\n\n"):
        fields = dict(re.findall(r"^(Package|Filename|SHA256): (.+)$", stanza, re.M))
        if "Package" in fields:
            index[fields["Package"]] = (fields["Filename"], fields["SHA256"])
    return index


def soname_index(hashes):
    """Shared-library file name -> package, from bullseye main's Contents index."""
    contents = gzip.decompress(checked(fetch(MIRROR + SUITE + "Contents-amd64.gz"),
                                       hashes["main/Contents-amd64.gz"],
                                       "Contents-amd64.gz")).decode()
    owners = {}
    for path, owner in re.findall(r"^((?:usr/)?lib/\S*?lib[^/\s]*\.so[^/\s]*)\s+(\S+)$",
                                  contents, re.M):
        owners.setdefault(os.path.basename(path), owner.split(",")[0].split("/")[-1])
    owners.update(SONAME_CHOICES)
    return owners


def unpack(name, index, root, debs):
    filename, sha256 = index[name]
    deb = os.path.join(debs, os.path.basename(filename))
    if not os.path.exists(deb):
        data = checked(fetch(MIRROR + filename), sha256, filename)
        with open(deb + ".part", "wb") as f:
            f.write(data)
        os.replace(deb + ".part", deb)
    subprocess.run(["dpkg-deb", "-x", deb, root], check=True)


def library_path(root):
    return ":".join(os.path.join(root, d) for d in LIBRARY_DIRS)


def missing_libraries(root):
    env = dict(os.environ, LD_LIBRARY_PATH=library_path(root))
    objects = [os.path.join(root, "usr/bin/caffe")]
    for d in LIBRARY_DIRS + ["usr/lib/python3/dist-packages/caffe"]:
        folder = os.path.join(root, d)
        if os.path.isdir(folder):
            objects += [os.path.join(folder, f) for f in os.listdir(folder) if ".so" in f]
    missing = set()
    for obj in objects:
        if os.path.isfile(obj):
            out = subprocess.run(["ldd", obj], capture_output=True, text=True, env=env).stdout
            missing |= set(re.findall(r"^\s*(\S+) => not found", out, re.M))
    return missing


def write_launchers(folder, root):
    with open(os.path.join(folder, "env.sh"), "w") as f:
        f.write(f"export LD_LIBRARY_PATH={library_path(root)}\n"
                f"export PATH={root}/usr/bin:$PATH\n"
                # glog would otherwise leave log files in /tmp at every run
                "export GLOG_logtostderr=${GLOG_logtostderr:-1}\n")
    for rel, text in STUBS.items():
        path = os.path.join(folder, "stubs", rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    launcher = os.path.join(folder, "pycaffe39")
    with open(launcher, "w") as f:
        f.write("#!/bin/bash\n# The real BVLC pycaffe (Debian bullseye), Python 3.9, CPU only.\n"
                f". {folder}/env.sh\n"
                "export GLOG_minloglevel=${GLOG_minloglevel:-2}\n"
                f"export PYTHONPATH={folder}/stubs${{PYTHONPATH:+:$PYTHONPATH}}\n"
                f'exec {root}/usr/bin/python3.9 "$@"\n')
    os.chmod(launcher, 0o755)
    return launcher


def install_site39(folder):
    """Unpack the SITE39_WHEELS into DIR/site39 (pip checks each wheel's hash); a
    failure is reported, not fatal: only the tests that need them skip."""
    site, wheels = os.path.join(folder, "site39"), os.path.join(folder, "wheels39")
    if os.path.isdir(site):
        return
    requirements = os.path.join(folder, "site39-requirements.txt")
    with open(requirements, "w") as f:
        f.writelines(f"{pin} --hash=sha256:{sha}\n" for pin, sha in SITE39_WHEELS.items())
    platforms = [arg for p in SITE39_PLATFORMS for arg in ("--platform", p)]
    got = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                          "--only-binary=:all:", "--python-version", "3.9",
                          "--implementation", "cp", "--abi", "cp39", *platforms,
                          "--require-hashes", "-r", requirements, "-d", wheels],
                         capture_output=True, text=True)
    if got.returncode != 0:
        print(f"note: no site39 (pip download failed: {got.stderr.strip()[-300:]}); "
              f"the oracle tests of skimage, scipy and pydot paths will skip", flush=True)
        return
    import zipfile
    partial = site + ".part"
    shutil.rmtree(partial, ignore_errors=True)
    for name in sorted(os.listdir(wheels)):
        with zipfile.ZipFile(os.path.join(wheels, name)) as wheel:
            wheel.extractall(partial)
    for root, _, files in os.walk(partial):     # zipfile drops the execute bits
        for name in files:
            if ".so" in name:
                os.chmod(os.path.join(root, name), 0o755)
    os.replace(partial, site)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", help="where to unpack (created; reused if it exists)")
    folder = os.path.abspath(parser.parse_args().folder)
    root, debs = os.path.join(folder, "root"), os.path.join(folder, "debs")
    os.makedirs(root, exist_ok=True)
    os.makedirs(debs, exist_ok=True)
    hashes = release_hashes(folder)
    index = package_index(hashes)
    for name in CAFFE_PACKAGES + PYTHON_PACKAGES:
        unpack(name, index, root, debs)
    owners, taken = soname_index(hashes), set()
    while True:
        wanted = {owners.get(so, so) for so in missing_libraries(root)} - taken
        if not wanted:
            break
        unknown = sorted(w for w in wanted if w not in index)
        if unknown:
            sys.exit(f"no bullseye package provides: {', '.join(unknown)}")
        for name in sorted(wanted):
            print("unpacking", name, flush=True)
            unpack(name, index, root, debs)
        taken |= wanted
    launcher = write_launchers(folder, root)
    subprocess.run([launcher, "-c", "import caffe; print('BVLC pycaffe', caffe.__version__)"],
                   check=True)
    install_site39(folder)
    print(f"export CAFFELITE_BVLC_PYCAFFE={launcher}")


if __name__ == "__main__":
    main()
