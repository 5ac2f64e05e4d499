#!/usr/bin/env python3
"""Regenerates data/corpus/*.txt.gz from the Debian packages the tiny test model was trained on.

Data preparation only: nothing in the build or the tests runs this. It needs apt-get and dpkg
(to fetch and unpack r-cran-janeaustenr and bible-kjv-text) and the `bible` program from the
Debian package bible-kjv (to decode bible.data, which is in that program's own compressed format).
R is not needed: the Jane Austen texts are read straight from the package's lazy-load database
by the small reader of R's serialization format below.

The texts are laid out exactly as the model saw them in training, which parity_refs.json in
models/tiny-llama-retrieval pins down: a novel is its janeaustenr line vector joined with "\n",
and the KJV is the output of `bible -f Gen1:1-Rev22:21` (one "Book1:1 text" verse per line),
split into training and held-out parts at 80% of its characters.

Usage: tools/corpus/extract.py [--out data/corpus] [--work /tmp/lychee-corpus]
"""

import argparse
import glob
import gzip
import hashlib
import os
import struct
import subprocess
import sys
import zlib

JANEAUSTENR_PACKAGE = "r-cran-janeaustenr"
KJV_TEXT_PACKAGE = "bible-kjv-text"
KJV_PROGRAM_PACKAGE = "bible-kjv"
KJV_HELDOUT_FRACTION = 0.2
# Calibration text must not overlap the held-out sets: a training novel plus the start of the
# KJV's training part, about 1.4 MB in all.
CALIBRATION_NOVEL = "prideprejudice"
CALIBRATION_KJV_CHARS = 700_000


# ---------------------------------------------------------------------------------------------
# R serialization (format versions 2 and 3, XDR binary), enough for data objects: vectors,
# pairlists, attributes and the reference table. Closures and environments are read only so
# far as needed to skip past them.

NILSXP, SYMSXP, LISTSXP, CLOSXP, ENVSXP, PROMSXP, LANGSXP = 0, 1, 2, 3, 4, 5, 6
CHARSXP, LGLSXP, INTSXP, REALSXP, CPLXSXP, STRSXP = 9, 10, 13, 14, 15, 16
DOTSXP, VECSXP, EXPRSXP, RAWSXP, S4SXP = 17, 19, 20, 24, 25
REFSXP, NILVALUE_SXP, PERSISTSXP = 255, 254, 247
ALTREP_SXP, ATTRLISTSXP, ATTRLANGSXP = 238, 239, 240
SINGLETON_SXPS = {253, 252, 251, 250, 242, 241}  # global/unbound/missing/base namespace/empty/base
PAIRLIST_SXPS = {LISTSXP, LANGSXP, CLOSXP, PROMSXP, DOTSXP, ATTRLISTSXP, ATTRLANGSXP}
LATIN1_MASK, UTF8_MASK = 1 << 2, 1 << 3


class RObject:
    """A value with R attributes (names, class, ...) kept beside it."""

    def __init__(self, value, attributes=None):
        self.value = value
        self.attributes = attributes or {}


class RUnserializer:
    def __init__(self, data):
        self.data = data
        self.pos = 0
        self.references = []

    def read_int(self):
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def read_bytes(self, count):
        chunk = self.data[self.pos:self.pos + count]
        self.pos += count
        return chunk

    def read_length(self):
        length = self.read_int()
        if length == -1:  # long vector: two more ints
            upper, lower = self.read_int(), self.read_int()
            length = (upper << 32) + (lower & 0xFFFFFFFF)
        return length

    def read_header(self):
        if self.read_bytes(2) != b"X\n":
            raise ValueError("not an XDR R serialization stream")
        version = self.read_int()
        self.read_int()  # writer's R version
        self.read_int()  # minimal reader version
        if version == 3:
            self.read_bytes(self.read_int())  # native encoding name
        elif version != 2:
            raise ValueError(f"unsupported serialization version {version}")

    def read_item(self):
        flags = self.read_int()
        sexp_type = flags & 0xFF
        levels = flags >> 12
        has_attributes = bool(flags & (1 << 9))
        has_tag = bool(flags & (1 << 10))

        if sexp_type == NILVALUE_SXP or sexp_type in SINGLETON_SXPS:
            return None
        if sexp_type == REFSXP:
            index = flags >> 8
            if index == 0:
                index = self.read_int()
            return self.references[index - 1]
        if sexp_type == PERSISTSXP:
            names = self.read_item()
            self.references.append(names)
            return names
        if sexp_type == SYMSXP:
            symbol = self.read_item()
            self.references.append(symbol)
            return symbol
        if sexp_type == ENVSXP:
            environment = {}
            self.references.append(environment)
            self.read_int()  # locked
            for _ in range(4):  # enclosure, frame, hash table, attributes
                self.read_item()
            return environment
        if sexp_type in PAIRLIST_SXPS:
            return self.read_pairlist(has_attributes, has_tag)
        if sexp_type == CHARSXP:
            length = self.read_int()
            if length == -1:
                return None  # NA_character_
            raw = self.read_bytes(length)
            return raw.decode("latin-1" if levels & LATIN1_MASK else "utf-8")
        if sexp_type == ALTREP_SXP:
            raise ValueError("ALTREP objects are not supported by this reader")

        if sexp_type in (LGLSXP, INTSXP):
            length = self.read_length()
            value = list(struct.unpack_from(f">{length}i", self.data, self.pos))
            self.pos += 4 * length
        elif sexp_type == REALSXP:
            length = self.read_length()
            value = list(struct.unpack_from(f">{length}d", self.data, self.pos))
            self.pos += 8 * length
        elif sexp_type == CPLXSXP:
            length = self.read_length()
            parts = struct.unpack_from(f">{2 * length}d", self.data, self.pos)
            self.pos += 16 * length
            value = [complex(parts[i], parts[i + 1]) for i in range(0, 2 * length, 2)]
        elif sexp_type == RAWSXP:
            value = self.read_bytes(self.read_length())
        elif sexp_type in (STRSXP, VECSXP, EXPRSXP):
            value = [self.read_item() for _ in range(self.read_length())]
        elif sexp_type == S4SXP:
            value = None
        else:
            raise ValueError(f"unsupported SEXP type {sexp_type} at byte {self.pos - 4}")
        attributes = self.read_item() if has_attributes else None
        return RObject(value, attributes) if attributes else value

    def read_pairlist(self, has_attributes, has_tag):
        """A pairlist as a dict tag -> value (untagged cells get their position as key)."""
        cells = {}
        while True:
            if has_attributes:
                self.read_item()
            tag = self.read_item() if has_tag else len(cells)
            cells[tag] = self.read_item()
            flags = self.read_int()
            sexp_type = flags & 0xFF
            if sexp_type not in PAIRLIST_SXPS:
                # The cdr is not another cell: step back and read it as an ordinary item.
                self.pos -= 4
                if self.read_item() is not None:
                    raise ValueError("dotted pairlists are not supported")
                return cells
            has_attributes = bool(flags & (1 << 9))
            has_tag = bool(flags & (1 << 10))


def as_dict(named_list):
    """An R named list as a dict name -> element."""
    return dict(zip(named_list.attributes["names"], named_list.value))


def unserialize(data):
    reader = RUnserializer(data)
    reader.read_header()
    return reader.read_item()


def read_lazy_load_db(base_path):
    """The objects of an R lazy-load database (base.rdx index + base.rdb blobs) as a dict."""
    with gzip.open(base_path + ".rdx", "rb") as index_file:
        index = as_dict(unserialize(index_file.read()))
    if index["compressed"] != [1]:  # TRUE (zlib); 2 and 3 would be bzip2 and xz
        raise ValueError(f"{base_path}.rdb: only zlib-compressed databases are supported")
    with open(base_path + ".rdb", "rb") as blob_file:
        blobs = blob_file.read()
    objects = {}
    for name, (offset, length) in as_dict(index["variables"]).items():
        blob = blobs[offset:offset + length]
        (expected_length,) = struct.unpack_from(">I", blob, 0)
        payload = zlib.decompress(blob[4:])
        if len(payload) != expected_length:
            raise ValueError(f"{name}: {len(payload)} bytes, index says {expected_length}")
        objects[name] = unserialize(payload)
    return objects


# ---------------------------------------------------------------------------------------------


def run(command, **kwargs):
    return subprocess.run(command, check=True, **kwargs)


def package_version(deb_path):
    return run(["dpkg-deb", "-f", deb_path, "Version"], capture_output=True,
               text=True).stdout.strip()


def fetch_and_unpack(package, work_dir):
    """Downloads the .deb with apt-get (unless one is already in work_dir) and unpacks it."""
    debs = glob.glob(os.path.join(work_dir, f"{package}_*.deb"))
    if not debs:
        run(["apt-get", "download", package], cwd=work_dir)
        debs = glob.glob(os.path.join(work_dir, f"{package}_*.deb"))
    if len(debs) != 1:
        raise RuntimeError(f"expected one {package} .deb in {work_dir}, found {debs}")
    unpack_dir = os.path.join(work_dir, "root")
    run(["dpkg", "-x", debs[0], unpack_dir])
    return debs[0], unpack_dir


def installed_version(package):
    result = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True,
                            text=True)
    return result.stdout.strip() if result.returncode == 0 else None


def split_at_verse_boundary(kjv_text, fraction_held_out):
    """(training part, held-out part). The held-out part starts at the first verse after the
    character the model's trainer split at, so that it holds no training text."""
    split = int(len(kjv_text) * (1 - fraction_held_out))
    verse_start = kjv_text.find("\n", split) + 1
    return kjv_text[:split], kjv_text[verse_start:]


def prefix_at_verse_boundary(kjv_text, max_chars):
    return kjv_text[:kjv_text.rfind("\n", 0, max_chars) + 1]


def write_gzip(path, text):
    """Byte-for-byte reproducible: no file name or time stamp in the gzip header."""
    data = text.encode("utf-8")
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw,
                                                compresslevel=9, mtime=0) as compressed:
        compressed.write(data)
    digest = hashlib.sha256(data).hexdigest()
    print(f"{path}: {len(data)} bytes of text, {os.path.getsize(path)} gzipped, "
          f"text sha256 {digest}")


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/corpus")
    parser.add_argument("--work", default="/tmp/lychee-corpus")
    args = parser.parse_args()
    os.makedirs(args.work, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)

    if installed_version(KJV_PROGRAM_PACKAGE) is None:
        sys.exit(f"needs the `bible` program: apt-get install {KJV_PROGRAM_PACKAGE}")

    austen_deb, austen_root = fetch_and_unpack(JANEAUSTENR_PACKAGE, args.work)
    kjv_deb, kjv_root = fetch_and_unpack(KJV_TEXT_PACKAGE, args.work)
    print(f"{JANEAUSTENR_PACKAGE} {package_version(austen_deb)}, "
          f"{KJV_TEXT_PACKAGE} {package_version(kjv_deb)}, "
          f"{KJV_PROGRAM_PACKAGE} {installed_version(KJV_PROGRAM_PACKAGE)}")

    novels = read_lazy_load_db(
        os.path.join(austen_root, "usr/lib/R/site-library/janeaustenr/data/Rdata"))
    kjv_text = run(["bible", "-f", "-p", os.path.join(kjv_root, "usr/lib"), "Gen1:1-Rev22:21"],
                   capture_output=True, text=True).stdout
    kjv_training, kjv_heldout = split_at_verse_boundary(kjv_text, KJV_HELDOUT_FRACTION)

    write_gzip(os.path.join(args.out, "persuasion.txt.gz"), "\n".join(novels["persuasion"]))
    write_gzip(os.path.join(args.out, "kjv-heldout.txt.gz"), kjv_heldout)
    calibration = ("\n".join(novels[CALIBRATION_NOVEL]) + "\n\n\n" +
                   prefix_at_verse_boundary(kjv_training, CALIBRATION_KJV_CHARS))
    write_gzip(os.path.join(args.out, "calibration.txt.gz"), calibration)


if __name__ == "__main__":
    main()
