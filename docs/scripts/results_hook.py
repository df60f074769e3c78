"""MkDocs hook: publishes the committed benchmark reports (benchmarks/results/, outside the docs
folder, where the scripts write them) under ``benchmarks/`` in the site, so the guides link to
the reports themselves rather than to copies."""

from pathlib import Path

from mkdocs.structure.files import File

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def on_files(files, config):
    for path in sorted(RESULTS.rglob("*")):
        if path.is_file() and path.suffix in (".md", ".csv", ".png"):
            uri = "benchmarks/" + path.relative_to(RESULTS).as_posix()
            files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files
