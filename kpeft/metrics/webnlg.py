"""The WebNLG 2017 challenge's automatic evaluation (docs/benchmarks.md).

The challenge scorer (``webnlg-automatic-evaluation``: ``evaluation.py`` + ``multi-bleu.perl -lc``,
METEOR 1.5 ``-l en -norm -r 3``, tercom 0.7.25) is what prefix-tuning and the Kernel-mix /
Inducer-tuning code ran. Here:

* **Text.** A hypothesis line is ``unidecode(line.strip())``, lower-cased, ``unidecode``-d again,
  cut by ``re.split(r"(\\W)")`` and re-joined with single spaces. A reference is cut the same way
  *first*, then lower-cased and ``unidecode``-d (the order matters: ``unidecode`` can create new
  non-word characters, which the reference side therefore keeps attached).
* **References.** The first three lexicalisations of each entry, in XML order; an entry with fewer
  contributes empty reference strings (583 of the 1,862 test entries).
* **BLEU** = ``multi-bleu.perl -lc`` over three reference streams = ``sacrebleu`` with no
  tokenisation, lower-casing, no smoothing, *empty references kept* (they take part in the
  closest-reference-length choice). Reported ×100.
* **METEOR** = the METEOR 1.5 jar shipped in the PyPI wheel ``pycocoevalcap``, run by the system
  Java with the challenge's ``-l en -norm`` over exactly three (padded) references per entry. One
  JVM scores every segment (``-stdio``), then the jar aggregates the segment statistics of each
  subset itself — the same statistics and the same aggregation as the challenge's file mode.
  A fraction.
* **TER** = tercom 0.7.25's multi-reference TER: per segment the fewest edits over the entry's
  *non-empty* references and their average length, summed over segments (case-insensitive, no
  punctuation normalisation). A fraction. Computed by :mod:`kpeft.metrics.ter`, which follows
  tercom's shift search step by step: ``sacrebleu``'s port differs in it (e.g. 36,782 vs 36,781
  edits for ADAPT's submission, and ±25 edits on SEEN / UNSEEN for the Baseline) and is not used.
  Pure Python: a few minutes for the 1,862 test entries.
* **Subsets**: ALL = every entry in order; UNSEEN = categories MeanOfTransportation,
  CelestialBody, Politician, Athlete, Artist; SEEN = the ten others.

Checked against the challenge's own outputs, the teams' submissions and the scores the official
scripts printed for them (``tests/test_metrics_webnlg.py``): BLEU equal to the printed two decimals,
METEOR to every printed digit and TER's edit counts and lengths exactly, on SEEN / UNSEEN / ALL.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from kpeft.errors import KpeftError

UNSEEN_CATEGORIES = frozenset({"MeanOfTransportation", "CelestialBody", "Politician", "Athlete", "Artist"})
SEEN_CATEGORIES = frozenset({
    "Airport", "Astronaut", "Building", "City", "ComicsCharacter", "Food", "Monument", "SportsTeam",
    "University", "WrittenWork",
})
SUBSETS = ("seen", "unseen", "all")
N_REFS = 3  # the challenge scores against the first three lexicalisations
METEOR_MODES = ("jar", "approx", "off")

_WORD_SPLIT = re.compile(r"(\W)")


def _unidecode(text: str) -> str:
    try:
        from unidecode import unidecode
    except ImportError:  # pragma: no cover - a declared dependency
        raise KpeftError("the WebNLG metrics need `pip install unidecode`") from None
    return unidecode(text)


def _split_join(text: str) -> str:
    """``re.split(r'(\\W)')`` pieces joined by spaces, runs of whitespace collapsed."""
    return " ".join(" ".join(_WORD_SPLIT.split(text)).split())


def preprocess_hypothesis(line: str) -> str:
    """A system output line as the challenge's ``evaluation.py`` writes it for the scorers."""
    return _split_join(_unidecode(_unidecode(line.strip()).lower()))


def preprocess_reference(lex: str) -> str:
    """A lexicalisation as the challenge's reference files hold it (split first, then fold)."""
    return _unidecode(_split_join(lex).lower())


def subset_of(category: str) -> str:
    """``"unseen"`` for the five categories absent from training, else ``"seen"``."""
    return "unseen" if category in UNSEEN_CATEGORIES else "seen"


def reference_triples(references: Sequence[Sequence[str]]) -> list[list[str]]:
    """Per entry exactly three preprocessed references: the first three, padded with ``""``."""
    out = []
    for refs in references:
        if not refs:
            raise KpeftError("a WebNLG entry has no reference (lexicalisation)")
        first = [preprocess_reference(r) for r in list(refs)[:N_REFS]]
        out.append(first + [""] * (N_REFS - len(first)))
    return out


# ---------------------------------------------------------------- BLEU (sacrebleu) / TER (tercom)
def bleu(hypotheses: Sequence[str], refs3: Sequence[Sequence[str]]) -> float:
    """``multi-bleu.perl -lc`` with three reference streams (×100). Inputs are preprocessed; the
    empty padding references are kept, as the challenge's reference files keep empty lines."""
    from sacrebleu.metrics import BLEU

    if not hypotheses:
        raise KpeftError("BLEU of an empty corpus")
    streams = [[refs[k] for refs in refs3] for k in range(N_REFS)]
    metric = BLEU(tokenize="none", lowercase=True, smooth_method="none", force=True)
    return float(metric.corpus_score(list(hypotheses), streams).score)


def ter_segments(hypotheses: Sequence[str], refs3: Sequence[Sequence[str]]) -> list[tuple[float, float]]:
    """Per segment (fewest edits over its non-empty references, their average length): tercom
    0.7.25's multi-reference statistics (:mod:`kpeft.metrics.ter`: case-insensitive, no
    normalisation, whitespace tokens)."""
    from kpeft.metrics.ter import multi_reference_ter

    return [multi_reference_ter(hyp, [r for r in refs if r]) for hyp, refs in zip(hypotheses, refs3)]


def ter_from_segments(stats: Sequence[tuple[float, float]]) -> float:
    """Total edits / total average reference length, summed in segment order (a fraction)."""
    if not stats:
        raise KpeftError("TER of an empty corpus")
    edits = length = 0.0
    for e, n in stats:
        edits += e
        length += n
    return edits / length if length > 0 else float(edits > 0)


def ter(hypotheses: Sequence[str], refs3: Sequence[Sequence[str]]) -> float:
    """tercom's multi-reference TER (a fraction) of preprocessed hypotheses and reference triples."""
    return ter_from_segments(ter_segments(hypotheses, refs3))


# ---------------------------------------------------------------- METEOR 1.5 (the official jar)
def meteor_jar_path() -> Path:
    """The METEOR 1.5 jar inside the PyPI package ``pycocoevalcap`` (its paraphrase table beside it)."""
    try:
        from importlib.resources import files

        jar = Path(str(files("pycocoevalcap") / "meteor" / "meteor-1.5.jar"))
    except ModuleNotFoundError:
        raise KpeftError(
            "METEOR needs the METEOR 1.5 jar from `pip install pycocoevalcap`; or pass "
            "task.options.meteor=approx (an approximation, reported as meteor_approx) or meteor=off"
        ) from None
    if not jar.is_file():
        raise KpeftError(f"the METEOR 1.5 jar is missing from pycocoevalcap ({jar}); reinstall pycocoevalcap")
    return jar


def java_executable() -> str:
    java = shutil.which("java")
    if java is None:
        raise KpeftError(
            "METEOR 1.5 needs a Java runtime: install one (Debian/Ubuntu: apt-get install "
            "default-jre-headless) so that `java` is on PATH; or pass task.options.meteor=approx "
            "(an approximation, reported as meteor_approx) or task.options.meteor=off"
        )
    return java


class MeteorJar:
    """One METEOR 1.5 JVM in ``-stdio`` mode with the challenge's options (``-l en -norm``).

    ``stats(hyp, refs)`` returns a segment's sufficient statistics (exactly what file mode
    computes for that line); ``aggregate(stats)`` lets the jar add them up and score the total
    (its own ``addStats`` + ``computeMetrics``, as file mode does for the whole file).
    """

    def __init__(self, timeout_s: float = 600.0):
        cmd = [
            java_executable(), "-Xmx2G", "-Duser.language=en", "-Duser.country=US",
            "-jar", str(meteor_jar_path()), "-", "-", "-stdio", "-l", "en", "-norm",
        ]
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr)
        self.timeout_s = timeout_s

    def _ask(self, line: str, n_answers: int = 1) -> list[str]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write((line + "\n").encode("utf-8"))
            self.proc.stdin.flush()
            answers = [self.proc.stdout.readline().decode("utf-8").strip() for _ in range(n_answers)]
        except (BrokenPipeError, OSError):
            answers = [""]
        if any(not a or a.startswith("Error") for a in answers):
            raise KpeftError(f"the METEOR jar failed: {answers[-1] or self._stderr_tail()}")
        return answers

    def _stderr_tail(self) -> str:
        self._stderr.seek(0)
        text = self._stderr.read().decode("utf-8", "replace").strip().splitlines()
        return text[-1] if text else "it exited without a message (is there 2 GB of memory for -Xmx2G?)"

    @staticmethod
    def _field(text: str) -> str:
        # The stdio protocol separates fields by "|||"; the preprocessed text never holds it
        # (every "|" is its own token), raw text might.
        return text.replace("|||", "| | |").strip()

    def stats(self, hypothesis: str, references: Sequence[str]) -> str:
        refs = " ||| ".join(self._field(r) for r in references)
        # A trailing blank keeps an empty hypothesis as its own (empty) field: Java's split drops
        # trailing empty strings, and the jar trims every field.
        return self._ask(f"SCORE ||| {refs} ||| {self._field(hypothesis)} ")[0]

    def aggregate(self, stats: Sequence[str]) -> float:
        """The jar's corpus score of these segments (it prints one score per segment, then the total)."""
        answers = self._ask("EVAL ||| " + " ||| ".join(stats), n_answers=len(stats) + 1)
        return float(answers[-1])

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()

    def __enter__(self) -> MeteorJar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def meteor_subsets(
    hypotheses: Sequence[str], refs3: Sequence[Sequence[str]], subsets: dict[str, Sequence[int]]
) -> dict[str, float | None]:
    """METEOR 1.5 (``-l en -norm``, three references per entry) of each subset of segment indices,
    in one JVM. Inputs are preprocessed."""
    with MeteorJar() as jar:
        stats = [jar.stats(h, refs) for h, refs in zip(hypotheses, refs3)]
        return {name: (jar.aggregate([stats[i] for i in idx]) if idx else None) for name, idx in subsets.items()}


# ---------------------------------------------------------------- approximate METEOR (asked for only)
# METEOR 1.5's English parameters (alpha, beta, gamma); the approximation matches exact words and
# Porter stems only (no WordNet synonyms, no paraphrase table, no function-word weighting).
_APPROX_ALPHA, _APPROX_BETA, _APPROX_GAMMA = 0.85, 0.20, 0.60


def _approx_alignment(hyp: list[str], ref: list[str], stem: Callable[[str], str]) -> tuple[int, int]:
    """(matches, chunks) of a greedy left-to-right one-to-one alignment: exact words first, then stems."""
    used_ref: set[int] = set()
    pairs: dict[int, int] = {}
    for key in (lambda w: w, stem):
        ref_keys = [key(w) for w in ref]
        for i, w in enumerate(hyp):
            if i in pairs:
                continue
            k = key(w)
            for j, r in enumerate(ref_keys):
                if j not in used_ref and r == k:
                    pairs[i] = j
                    used_ref.add(j)
                    break
    chunks, prev = 0, None
    for i in sorted(pairs):
        if prev is None or i != prev[0] + 1 or pairs[i] != prev[1] + 1:
            chunks += 1
        prev = (i, pairs[i])
    return len(pairs), chunks


def _approx_score(m: float, chunks: float, hyp_len: float, ref_len: float) -> float:
    if m == 0 or hyp_len == 0 or ref_len == 0:
        return 0.0
    p, r = m / hyp_len, m / ref_len
    fmean = p * r / (_APPROX_ALPHA * p + (1 - _APPROX_ALPHA) * r)
    return fmean * (1 - _APPROX_GAMMA * (chunks / m) ** _APPROX_BETA)


def meteor_approx(hypotheses: Sequence[str], refs3: Sequence[Sequence[str]]) -> float:
    """An APPROXIMATION of METEOR (exact + Porter-stem unigram matches, METEOR 1.5's English
    parameters, best non-empty reference per segment, statistics pooled over the corpus). It does
    not reproduce the official numbers and is reported under its own name, ``meteor_approx``."""
    from nltk.stem.porter import PorterStemmer

    stem = PorterStemmer().stem
    tot_m = tot_chunks = tot_h = tot_r = 0.0
    for hyp, refs in zip(hypotheses, refs3):
        h = hyp.split()
        best = (-1.0, 0, 0, 0)
        for ref in (r for r in refs if r):
            rw = ref.split()
            m, c = _approx_alignment(h, rw, stem)
            best = max(best, (_approx_score(m, c, len(h), len(rw)), m, c, len(rw)))
        _, m, c, rl = best
        tot_m, tot_chunks, tot_h, tot_r = tot_m + m, tot_chunks + c, tot_h + len(h), tot_r + rl
    return _approx_score(tot_m, tot_chunks, tot_h, tot_r)


# ---------------------------------------------------------------- the challenge's report
def evaluate(
    hypotheses: Sequence[str],
    references: Sequence[Sequence[str]],
    categories: Sequence[str],
    meteor: str = "jar",
) -> dict[str, dict[str, float | None]]:
    """BLEU (×100), METEOR and TER (fractions) on SEEN / UNSEEN / ALL.

    ``hypotheses``: raw system output, one string per entry; ``references``: each entry's raw
    lexicalisations in XML order (all of them; the first three are used); ``categories``: each
    entry's category. ``meteor``: ``jar`` (official), ``approx`` (reported as ``meteor_approx``)
    or ``off``. A subset with no entries scores ``None``.
    """
    if meteor not in METEOR_MODES:
        raise KpeftError(f"unknown METEOR mode '{meteor}'; valid: {', '.join(METEOR_MODES)}")
    if not (len(hypotheses) == len(references) == len(categories)):
        raise KpeftError(
            f"{len(hypotheses)} hypotheses for {len(references)} WebNLG entries: one output line per entry"
        )
    hyps = [preprocess_hypothesis(h) for h in hypotheses]
    refs3 = reference_triples(references)
    index = {
        "seen": [i for i, c in enumerate(categories) if subset_of(c) == "seen"],
        "unseen": [i for i, c in enumerate(categories) if subset_of(c) == "unseen"],
        "all": list(range(len(hyps))),
    }

    def per_subset(fn: Callable[[list[str], list[list[str]]], float]) -> dict[str, float | None]:
        return {s: (fn([hyps[i] for i in idx], [refs3[i] for i in idx]) if idx else None) for s, idx in index.items()}

    out: dict[str, dict[str, float | None]] = {"bleu": per_subset(bleu)}
    if meteor == "jar":
        out["meteor"] = meteor_subsets(hyps, refs3, index)
    elif meteor == "approx":
        out["meteor_approx"] = per_subset(meteor_approx)
    ter_stats = ter_segments(hyps, refs3)  # the slow part: computed once, summed per subset
    out["ter"] = {s: (ter_from_segments([ter_stats[i] for i in idx]) if idx else None) for s, idx in index.items()}
    return out
