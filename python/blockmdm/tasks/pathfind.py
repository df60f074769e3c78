"""Path-star graphs (Bachmann & Nagarajan): find the arm of a star that leads to the goal.

A graph has ``degree`` arms leaving a source s, each ``path_len`` nodes long counting s; node
ids are drawn at random from range(n_nodes) and the directed edges (parent, child) are shuffled.
Line k of a set is drawn from its own splitmix64 stream keyed by (seed, k) (``tasks._common``);
the native engine (``blockmdm_kernels.native_ops().star_graphs``) draws the same lines. A line is
``u,v|u,v|...|u,v/s,g=p1,p2,...,p_len`` with p1 = s and p_len = g.

Tokens: node i -> i, ``|`` -> N, ``=`` -> N+1, ``/`` -> N+2, ``$`` (pad) -> N+3, MASK -> N+4
(written ``?`` by ``decode``), N = n_nodes; commas are dropped. ``encode`` aligns ``=`` across
lines of different lengths by left-padding the prompt and right-padding the response with ``$``.
"""

from __future__ import annotations

import numpy as np
import torch

import blockmdm_kernels as bk
from blockmdm.tasks._common import Stream, cached_lines, check_int, key, read_lines

CONTINUOUS = False
DEFAULTS = {"n_nodes": 100, "degree": 3, "path_len": 10}


def _check(n_nodes=100, degree=3, path_len=10):
    check_int("n_nodes", n_nodes, 2)
    check_int("degree", degree, 1)
    check_int("path_len", path_len, 2)
    if 1 + degree * (path_len - 1) > n_nodes:
        raise ValueError(
            f"n_nodes must be >= 1 + degree * (path_len - 1) = {1 + degree * (path_len - 1)}, "
            f"got {n_nodes}"
        )


def vocab_size(n_nodes=100, **params) -> int:
    return n_nodes + 5


def mask_id(n_nodes=100, **params) -> int:
    return n_nodes + 4


def pad_id(n_nodes=100, **params) -> int:
    return n_nodes + 3


def prompt_len(n_nodes=100, degree=3, path_len=10) -> int:
    """Tokens up to and including ``=``: 3 per edge (the last without ``|``), ``/ s g =``."""
    return 3 * degree * (path_len - 1) - 1 + 4


def seq_len(n_nodes=100, degree=3, path_len=10) -> int:
    return prompt_len(n_nodes, degree, path_len) + path_len


def _graph_line(seed: int, index: int, n_nodes: int, degree: int, path_len: int) -> str:
    """Line ``index`` of the set ``seed`` (csrc/tasks.cpp star_graphs draws the same)."""
    rng = Stream(key(seed, index))
    m = 1 + degree * (path_len - 1)
    pool = list(range(n_nodes))
    for i in range(m):  # partial Fisher-Yates: m distinct nodes
        j = i + rng.below(n_nodes - i)
        pool[i], pool[j] = pool[j], pool[i]
    source, arms = pool[0], []
    for a in range(degree):
        arms.append([source] + pool[1 + a * (path_len - 1): 1 + (a + 1) * (path_len - 1)])
    edges = [(arm[i], arm[i + 1]) for arm in arms for i in range(path_len - 1)]
    rng.shuffle(edges)
    path = arms[rng.below(degree)]
    return (
        "|".join(f"{u},{v}" for u, v in edges)
        + f"/{source},{path[-1]}="
        + ",".join(map(str, path))
    )


def generate(n: int, seed: int = 0, n_nodes: int = 100, degree: int = 3, path_len: int = 10,
             cache_dir=None, cache: bool = True) -> list:
    """``n`` star-graph lines, deterministic in (n, seed, params) and the same with or without
    the native engine; cached (``tasks._common``)."""
    check_int("n", n, 0)
    check_int("seed", seed, 0)
    _check(n_nodes, degree, path_len)

    def make():
        if bk.native_available():
            return bk.native_ops().star_graphs(seed % 2**64, 0, n, n_nodes, degree, path_len)
        return [_graph_line(seed, k, n_nodes, degree, path_len) for k in range(n)]

    params = {"n_nodes": n_nodes, "degree": degree, "path_len": path_len}
    return cached_lines("pathfind", params, n, seed, make, cache_dir, cache)


def parse_line(line: str, n_nodes: int = 100):
    """(edges, source, goal, path) of a line; raises ValueError with the reason."""
    if line.count("/") != 1 or line.count("=") != 1 or line.index("/") > line.index("="):
        raise ValueError("expected 'edges/s,g=path' with one '/' before one '='")
    edge_text, rest = line.split("/")
    query, path_text = rest.split("=")

    def ints(text, what):
        try:
            values = [int(x) for x in text.split(",")]
        except ValueError:
            raise ValueError(f"{what} must be comma-separated node ids, got {text!r}") from None
        for v in values:
            if not 0 <= v < n_nodes:
                raise ValueError(f"node {v} in {what} is outside [0, {n_nodes})")
        return values

    edges = []
    for item in edge_text.split("|"):
        pair = ints(item, "edge")
        if len(pair) != 2:
            raise ValueError(f"an edge must be 'u,v', got {item!r}")
        edges.append(tuple(pair))
    sg = ints(query, "query")
    if len(sg) != 2:
        raise ValueError(f"the query must be 's,g', got {query!r}")
    path = ints(path_text, "path")
    return edges, sg[0], sg[1], path


def follows_edges(path, edges, source, goal) -> bool:
    """``path`` goes from ``source`` to ``goal`` along the directed ``edges``."""
    if not path or path[0] != source or path[-1] != goal or any(p is None for p in path):
        return False
    edge_set = set(edges)
    return all((u, v) in edge_set for u, v in zip(path, path[1:]))


def _spaced(line: str) -> str:
    for c in "|=/$?":
        line = line.replace(c, f" {c} ")
    return line.replace(",", " ")


def _line_tokens(line: str, table: dict):
    try:
        return [table[item] for item in _spaced(line).split()]
    except KeyError as err:
        item = err.args[0]
        if item.isdigit():
            raise ValueError(f"node {item} is outside [0, {len(table) - 5})") from None
        raise ValueError(f"invalid token {item!r}") from None


def _table(n_nodes: int) -> dict:
    table = {str(i): i for i in range(n_nodes)}
    table.update({"|": n_nodes, "=": n_nodes + 1, "/": n_nodes + 2, "$": n_nodes + 3,
                  "?": n_nodes + 4})
    return table


def encode(lines, n_nodes: int = 100) -> dict:
    """Token ids of ``lines``.

    Returns ``{"tokens": int64 [n, T], "prompt_len": int, "vocab_size": N + 5, "mask_id": N + 4,
    "pad_id": N + 3}``; ``tokens[:, :prompt_len]`` ends with ``=``. Lines whose prompts or
    responses differ in length are padded with ``$`` (prompts on the left, responses on the
    right). Raises ValueError naming the line on a malformed one.
    """
    rows, table = [], _table(n_nodes)
    eq = n_nodes + 1
    for k, line in enumerate(lines):
        try:
            row = _line_tokens(line, table)
        except ValueError as err:
            raise ValueError(f"line {k + 1}: {err}") from None
        if row.count(eq) != 1:
            raise ValueError(f"line {k + 1}: expected exactly one '='")
        rows.append(row)
    pad = n_nodes + 3
    cut = [row.index(eq) + 1 for row in rows]
    p_len = max(cut, default=0)
    r_len = max((len(row) - c for row, c in zip(rows, cut)), default=0)
    padded = [[pad] * (p_len - c) + row + [pad] * (r_len - len(row) + c)
              for row, c in zip(rows, cut)]
    tokens = torch.tensor(padded, dtype=torch.int64).reshape(len(rows), p_len + r_len)
    return {"tokens": tokens, "prompt_len": p_len, "vocab_size": n_nodes + 5,
            "mask_id": n_nodes + 4, "pad_id": pad}


def decode(tokens, n_nodes: int = 100) -> list:
    """Lines of ``tokens`` [n, T]: ``$`` pads dropped, MASK written ``?``."""
    tok = torch.as_tensor(tokens)
    if tok.ndim != 2:
        raise ValueError(f"tokens must be 2-D [n, T], got shape {tuple(tok.shape)}")
    if tok.numel() and (tok.min() < 0 or tok.max() >= n_nodes + 5):
        raise ValueError(f"tokens must lie in [0, {n_nodes + 5}), got {tok.min()}..{tok.max()}")
    symbols = {n_nodes: "|", n_nodes + 1: "=", n_nodes + 2: "/", n_nodes + 4: "?"}
    lines = []
    for row in tok.tolist():
        text, prev_node = [], False
        for t in row:
            if t == n_nodes + 3:
                continue
            is_node = t < n_nodes
            if is_node and prev_node:
                text.append(",")
            text.append(str(t) if is_node else symbols[t])
            prev_node = is_node
        lines.append("".join(text))
    return lines


def _predicted_paths(predictions, n, prompt_cut, width, n_nodes):
    """Per row, the predicted path as a list of node ids (None for a non-node token)."""
    if isinstance(predictions, (list, tuple)) and all(isinstance(s, str) for s in predictions):
        if len(predictions) != n:
            raise ValueError(f"predictions must hold {n} lines, got {len(predictions)}")
        out = []
        for line in predictions:
            items = line.split("=")[-1].split(",")
            out.append([int(x) if x.isdigit() and int(x) < n_nodes else None for x in items])
        return out
    if not isinstance(predictions, (torch.Tensor, np.ndarray)):
        raise TypeError("predictions must be a token tensor [n, T] or a list of lines")
    pred = torch.as_tensor(predictions).long().cpu()
    if pred.ndim != 2 or pred.shape[0] != n or pred.shape[1] not in (width, width - prompt_cut):
        raise ValueError(f"predictions must be [{n}, {width}] (full) or [{n}, "
                         f"{width - prompt_cut}] (response), got {tuple(pred.shape)}")
    out = []
    for row in pred[:, pred.shape[1] - (width - prompt_cut):].tolist():
        while row and row[-1] == n_nodes + 3:
            row.pop()
        out.append([t if 0 <= t < n_nodes else None for t in row])
    return out


def evaluate(predictions, references, n_nodes: int = 100) -> dict:
    """Exact-path accuracy, token accuracy and valid-path rate.

    Args:
        predictions: int tokens [n, T] laid out like ``encode(references)`` (the path is read
            after its ``prompt_len``; trailing ``$`` dropped) or just their response part
            [n, T - prompt_len], or lines (the path after ``=``).
        references: lines, or int tokens [n, T] with ``=`` in one column (as from ``encode``).
    Returns:
        ``exact``: fraction of paths equal to the reference; ``token_accuracy``: fraction of
        reference path positions predicted right; ``valid``: fraction of predicted paths that
        follow edges from s to g; ``n``.
    """
    if isinstance(references, (torch.Tensor, np.ndarray)):
        ref_tok = torch.as_tensor(references).long().cpu()
        is_eq = ref_tok == n_nodes + 1
        if ref_tok.ndim != 2 or not (is_eq.sum(1) == 1).all() or (is_eq != is_eq[:1]).any():
            raise ValueError("reference tokens must be [n, T] with one '=' per row, in one column")
        prompt_cut = int(is_eq[0].long().argmax()) + 1 if len(ref_tok) else 0
        width = ref_tok.shape[1]
        references = decode(ref_tok, n_nodes)
    elif isinstance(references, (list, tuple)) and all(isinstance(s, str) for s in references):
        enc = encode(references, n_nodes)
        prompt_cut, width = enc["prompt_len"], enc["tokens"].shape[1]
    else:
        raise TypeError("references must be a list of lines or a token tensor [n, T]")
    parsed = []
    for k, line in enumerate(references):
        try:
            parsed.append(parse_line(line, n_nodes))
        except ValueError as err:
            raise ValueError(f"references line {k + 1}: {err}") from None
    paths = _predicted_paths(predictions, len(parsed), prompt_cut, width, n_nodes)
    exact = hits = total = valid = 0
    for (edges, s, g, ref), pred in zip(parsed, paths):
        exact += pred == ref
        hits += sum(p == r for p, r in zip(pred, ref))
        total += len(ref)
        valid += follows_edges(pred, edges, s, g)
    n = max(1, len(parsed))
    return {"exact": exact / n, "token_accuracy": hits / max(1, total), "valid": valid / n,
            "n": len(parsed)}


def check_line(line: str, n_nodes: int = 100) -> str:
    """The reason ``line`` is not a valid path line, or "" when it is."""
    try:
        edges, s, g, path = parse_line(line, n_nodes)
    except ValueError as err:
        return str(err)
    if path[0] != s or path[-1] != g:
        return f"the path must start at s={s} and end at g={g}"
    if not follows_edges(path, edges, s, g):
        return "the path does not follow the edges"
    return ""


def load_lines(path, n_nodes: int = 100) -> list:
    """Reads path lines from a text file (blank lines skipped).

    Raises ValueError naming the file, the line number and the reason for a bad line.
    """
    return read_lines(path, lambda line: check_line(line, n_nodes))
