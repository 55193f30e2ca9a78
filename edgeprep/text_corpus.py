"""A text corpus available offline: first sentences of the Python standard library's docstrings.

Sentence encoders are judged by embedding fidelity to their fp32 teacher on held-out text, and
that text has to exist without a network. The standard library documents itself in English prose
of varied length and topic (files, networking, numbers, text, dates, concurrency...), and it is on
every machine that runs edgeprep. The corpus:

- walks a fixed list of modules (``MODULES``) and their public functions, classes and methods,
  taking each docstring's first sentence; whitespace is collapsed, sentences of 5-40 words kept;
- drops duplicates, then orders sentences by the SHA-1 of their text (a deterministic shuffle that
  does not depend on the walk order), so a split by position is a split by hash;
- is collected in a fresh interpreter that sees only the standard library, so it is the same for
  the same Python version whatever the calling process imported; ``corpus_digest`` identifies it
  in reports (docstrings change between Python releases: compare numbers on one version).
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import re
import subprocess
import sys
import warnings
from functools import lru_cache
from pathlib import Path

MODULES = (
    "argparse", "asyncio", "base64", "bisect", "calendar", "codecs", "collections", "concurrent.futures",
    "configparser", "contextlib", "copy", "csv", "datetime", "decimal", "difflib", "email", "enum",
    "fractions", "ftplib", "functools", "gzip", "hashlib", "heapq", "hmac", "html", "http.client",
    "imaplib", "inspect", "io", "ipaddress", "itertools", "json", "logging", "mailbox", "math",
    "mimetypes", "multiprocessing", "operator", "os", "pathlib", "pickle", "platform", "pprint",
    "queue", "random", "re", "sched", "secrets", "selectors", "shlex", "shutil", "smtplib", "socket",
    "sqlite3", "ssl", "statistics", "string", "struct", "subprocess", "tarfile", "tempfile",
    "textwrap", "threading", "time", "timeit", "tokenize", "traceback", "typing", "unittest",
    "urllib.parse", "urllib.request", "uuid", "warnings", "wave", "weakref", "xml.dom.minidom",
    "xml.etree.ElementTree", "zipfile", "zlib",
)
MIN_WORDS, MAX_WORDS = 5, 40
_SENTENCE_END = re.compile(r"(?<=[a-z0-9)\]'\"`])\.(\s|$)")


def _first_sentence(doc: str) -> str | None:
    text = " ".join(doc.strip().split("\n\n", 1)[0].split())  # first paragraph, one line
    m = _SENTENCE_END.search(text)
    sentence = text[:m.start() + 1] if m else text
    words = sentence.split()
    if not MIN_WORDS <= len(words) <= MAX_WORDS or not sentence[0].isalpha():
        return None
    if ">>>" in sentence or "(" in words[0]:  # doctest lines and bare signatures are not prose
        return None
    return sentence


def _docstrings(module_name: str):
    try:
        module = importlib.import_module(module_name)
    except ImportError:  # a platform without it (e.g. no sqlite3 build): the rest still counts
        return
    yield inspect.getdoc(module) or ""
    for name, obj in sorted(vars(module).items()):
        # submodules are skipped: which of them are attributes depends on what was imported before
        if name.startswith("_") or inspect.ismodule(obj) or getattr(obj, "__module__", None) != module.__name__:
            continue
        yield inspect.getdoc(obj) or ""
        if inspect.isclass(obj):
            for attr, member in sorted(vars(obj).items()):
                if not attr.startswith("_") and callable(member):
                    yield inspect.getdoc(member) or ""


def _collect() -> list[str]:
    seen: set[str] = set()
    for module_name in MODULES:
        for doc in _docstrings(module_name):
            sentence = _first_sentence(doc)
            if sentence:
                seen.add(sentence)
    return sorted(seen, key=lambda s: hashlib.sha1(s.encode()).hexdigest())


@lru_cache(maxsize=1)
def stdlib_sentences() -> tuple[str, ...]:
    """The whole corpus, deterministically ordered (see the module docstring).

    Collected in a fresh interpreter with no site-packages (``python -I -S`` on this file): in a
    process where torch or transformers is loaded, they have patched standard classes (transformers
    adds methods to logging.Logger) and imported submodules, which would change the corpus."""
    done = subprocess.run([sys.executable, "-I", "-S", str(Path(__file__).resolve())], capture_output=True,
                          text=True, timeout=300, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"collecting the stdlib corpus failed: {done.stderr.strip()[-300:]}")
    return tuple(json.loads(done.stdout))


def split(n_train: int, n_test: int) -> tuple[list[str], list[str]]:
    """(train, test): disjoint slices of the hash-ordered corpus."""
    sentences = stdlib_sentences()
    if n_train + n_test > len(sentences):
        raise ValueError(f"the corpus has {len(sentences)} sentences, {n_train} + {n_test} asked for")
    return list(sentences[:n_train]), list(sentences[n_train:n_train + n_test])


def corpus_digest() -> str:
    """SHA-256 over the corpus (one sentence per line), to tell two corpora apart in a report."""
    return hashlib.sha256("\n".join(stdlib_sentences()).encode()).hexdigest()


if __name__ == "__main__":  # what stdlib_sentences runs, in an isolated interpreter
    warnings.simplefilter("ignore")  # deprecated modules (typing.io) warn when their docstrings are read
    json.dump(_collect(), sys.stdout)
