"""VLMEvalKit TSV files without pandas: data location checks, reproducible subsets, the built-in suite.

VLMEvalKit reads `<LMUData>/<name>.tsv` (columns `index`, `image` as base64 or a short reference to
another row's index, `question`, `answer`, `category`, ...) and checks its MD5. Everything here runs
before the model loads, so a wrong path fails in a second, not after minutes of loading.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import os
import random
import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from prunebench.errors import UserError

Row = dict[str, str]
IMAGE_REF_MAX = 64  # VLMEvalKit: an `image` cell this short names another row's index


def data_root(data_dir: str | os.PathLike[str] | None) -> Path:
    """`dataset.data_dir=` if given, else $LMUData, else VLMEvalKit's own default ~/LMUData."""
    if data_dir:
        return Path(data_dir).expanduser()
    return Path(os.environ.get("LMUData") or Path.home() / "LMUData")


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_data(root: Path, name: str, md5: str | None, url: str | None) -> Path:
    """The TSV's path, or one UserError line naming the file and how to obtain it."""
    path = root / f"{name}.tsv"
    how = f"download {url} to {path}" if url else f"write it to {path}"
    how += " (set dataset.data_dir= or $LMUData to its folder)"
    if not path.is_file():
        raise UserError(f"dataset {name}: {path} is missing; {how}")
    if md5 and (got := file_md5(path)) != md5:
        raise UserError(f"dataset {name}: {path} has MD5 {got}, expected {md5} (partial or other version); {how}")
    return path


def read_tsv(path: Path) -> tuple[list[str], list[Row]]:
    csv.field_size_limit(sys.maxsize)  # base64 images are long cells
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t")
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def write_tsv(path: Path, columns: Sequence[str], rows: Iterable[Mapping[str, object]]) -> Path:
    """Atomic write (tmp + rename), pandas-readable (`pd.read_csv(sep="\\t")`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), delimiter="\t", lineterminator="\n")
        writer.writeheader()
        writer.writerows({c: row.get(c, "") for c in columns} for row in rows)
    os.replace(tmp, path)
    return path


def _group_key(row: Row, group_by: str | None) -> str:
    if group_by is None:
        return row["index"]
    if group_by.startswith("index_mod:"):  # MMBench circular variants: index % 1e6 is the question
        return str(int(row["index"]) % int(group_by.split(":", 1)[1]))
    return row[group_by]


def subset_rows(rows: Sequence[Row], limit: int, seed: int, group_by: str | None = None,
                stratify: str | None = "category") -> list[Row]:
    """A reproducible subset of at most `limit` rows, in the file's order.

    Whole groups are kept (MME's two questions per image, MMBench's circular variants), because the
    scorers pair them; groups are drawn round-robin over the `stratify` column's values (seeded
    shuffle within each), so every category is present whenever `limit` allows (MME's rating
    needs all fourteen).
    """
    if limit < 1:
        raise UserError(f"dataset.limit must be a positive number of samples, got {limit}")
    groups: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        groups[_group_key(row, group_by)].append(i)
    strata: dict[str, list[str]] = defaultdict(list)
    for key, members in groups.items():
        strata[rows[members[0]].get(stratify, "") if stratify else ""].append(key)
    rng = random.Random(seed)
    queues = {s: rng.sample(keys, len(keys)) for s, keys in sorted(strata.items())}
    chosen: list[int] = []
    while any(queues.values()):
        for queue in queues.values():
            if queue and len(chosen) + len(groups[queue[0]]) <= limit:
                chosen += groups[queue.pop(0)]
            elif queue:
                queue.clear()  # the next group does not fit: this stratum is done
    return [rows[i] for i in sorted(chosen)]


def resolve_image_refs(rows: Sequence[Row], everything: Sequence[Row]) -> list[Row]:
    """Replace short `image` references by the referenced base64, so a subset stands alone."""
    by_index = {r["index"]: r.get("image", "") for r in everything}
    out = []
    for row in rows:
        image = row.get("image", "")
        if image and len(image) <= IMAGE_REF_MAX:
            row = {**row, "image": by_index[image]}
        out.append(row)
    return out


def subset_name(base: str, limit: int, seed: int) -> str:
    """Keeps `base` as a prefix: VLMEvalKit's scorers route on substrings of the dataset name."""
    return f"{base}_pbsub{limit}s{seed}"


def write_subset(root: Path, base: str, limit: int, seed: int, group_by: str | None = None,
                 stratify: str | None = "category") -> tuple[str, Path]:
    """Write `<root>/<base>_pbsub<limit>s<seed>.tsv` from `<root>/<base>.tsv`; -> (name, path)."""
    columns, rows = read_tsv(root / f"{base}.tsv")
    chosen = resolve_image_refs(subset_rows(rows, limit, seed, group_by, stratify), rows)
    name = subset_name(base, limit, seed)
    return name, write_tsv(root / f"{name}.tsv", columns, chosen)


def encode_png(image: object) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")  # type: ignore[attr-defined]
    return base64.b64encode(buf.getvalue()).decode("ascii")


def export_shapes(root: Path, name: str = "prunebench_shapes", n: int = 100, seed: int = 0,
                  image_size: int = 96) -> Path:
    """The built-in offline `shapes` suite as a VLMEvalKit TSV (index, image, question, answer, category)."""
    from prunebench.data.shapes import build_shapes

    rows = [{"index": it.index, "image": encode_png(it.image), "question": it.question,
             "answer": it.answer, "category": it.category}
            for it in build_shapes(n, seed=seed, image_size=image_size)]
    return write_tsv(root / f"{name}.tsv", ["index", "image", "question", "answer", "category"], rows)


PROBE_COLUMNS = ("index", "image", "question", "answer", "A", "B", "C", "D", "category")


def export_probe(root: Path, name: str = "prunebench_probe", n: int = 600, seed: int = 0, image_size: int = 96,
                 families: Sequence[str] | None = None) -> Path:
    """The probe suite as a VLMEvalKit TSV: index, image (base64 PNG), question (as asked, options
    included), answer, the MCQ options in columns A-D (attribute family only), category (= family)."""
    from prunebench.data.probe import build_probe, mcq_options

    rows = []
    for it in build_probe(n, seed=seed, image_size=image_size, families=families):
        rows.append({"index": it.index, "image": encode_png(it.image), "question": it.question,
                     "answer": it.answer, "category": it.category, **mcq_options(it.question)})
    return write_tsv(root / f"{name}.tsv", PROBE_COLUMNS, rows)
