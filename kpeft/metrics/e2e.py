"""The E2E NLG Challenge's official metrics (``e2e-metrics``' ``measure_scores.py``; Dušek et al. 2020; docs/benchmarks.md).

The official scorer, which the LoRA and prefix-tuning E2E tables ran, does this:

* **Data.** One system output line per MR, each ``strip()``-ed; the references of an MR are the
  rows of the CSV that share it (consecutive identical MRs), after four mis-encodings are repaired
  (:func:`fix_encoding`; applied by :mod:`kpeft.tasks.e2e`'s CSV reader).
* **BLEU and NIST** come from ``mteval-v13a-sig.pl`` (Perl), the NIST script adapted to a variable
  number of references. Ported here (:func:`mteval_words`, :func:`bleu_nist`); the Python port
  the challenge also shipped (``pymteval``) gives a different NIST and is not what was reported.

  - Tokenisation (:func:`mteval_words`): whitespace collapsed, the four SGML entities decoded,
    ASCII letters lower-cased, every ASCII punctuation mark except ``'`` ``,`` ``-`` ``.`` split
    off, ``.`` and ``,`` split off unless a digit stands on both sides, a ``-`` after a digit split
    off.
  - BLEU: corpus-level, n = 1..4, clipped counts against the per-MR maximum over its references,
    brevity penalty from the sum of the closest reference lengths (ties: the shorter); the script's
    smoothing (an n with no match counts ``1/(2^k · total)``) only matters for degenerate outputs.
  - NIST (Doddington 2002): n = 1..5; ``info(w1..wn) = log2(count(w1..wn-1) / count(w1..wn))``
    over all references of the test set (unigrams: total words / count); score =
    ``Σ_n Σ matched info / #hypothesis n-grams`` times the length penalty
    ``exp(-β log²(L_sys / L_ref))`` (1 when L_sys ≥ L_ref; β gives 0.5 at a ratio of 1.5), with
    ``L_ref`` = total reference words / average number of references per MR (E2E's change).
* **METEOR, ROUGE-L, CIDEr** come from the MS-COCO caption evaluation code, whose jars (METEOR 1.5
  with its paraphrase table, Stanford CoreNLP 3.4.1) the PyPI wheel ``pycocoevalcap`` 1.2 ships
  byte-identical to the challenge's copy. Texts go through the PTB tokenizer (``-preserveLines
  -lowerCase``, punctuation tokens dropped; :func:`ptb_tokenize`), then METEOR 1.5 ``-l en -norm``
  pools the segment statistics over the corpus (the jar in ``-stdio`` mode,
  :class:`kpeft.metrics.webnlg.MeteorJar`); ROUGE-L (best precision and best recall over the
  references, β = 1.2, averaged over MRs) and CIDEr-D (n = 1..4, σ = 6, document frequencies over
  the evaluated reference sets, ×10) are ``pycocoevalcap``'s own classes.

All five numbers are fractions except NIST and CIDEr; the official script prints 4 decimals
(``f"{x:.4f}"`` of these values). Checked against the official scorer's output
(``tests/test_metrics_e2e.py``, ``tests/test_tasks_e2e.py``).
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kpeft.errors import KpeftError

METEOR_MODES = ("jar", "approx", "off")
BLEU_N, NIST_N = 4, 5

# ---------------------------------------------------------------- text
# The challenge's reader repairs these mis-encodings in the reference CSV (measure_scores.read_tsv).
_ENCODING_FIXES = (("Ł", "£"), ("Â£", "£"), ("Ã©", "é"), ("ã©", "é"))


def fix_encoding(text: str) -> str:
    """The official reader's repairs of the reference CSV (``Ł``/``Â£`` → ``£``, ``Ã©``/``ã©`` → ``é``)."""
    for bad, good in _ENCODING_FIXES:
        text = text.replace(bad, good)
    return text


# Perl's \s on a character string (the mteval script reads its files in :utf8 mode).
_PERL_SPACE = re.compile("[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
# mteval-v13a's tokenize-punctuation class: { | } ~ [ \ ] ^ _ ` space ! " # $ % & ( ) * + : ; < = > ? @ /
_PUNCT = re.compile(r"([{-~\[-` -&(-+:-@/])")
_PERIOD_COMMA_AFTER_NONDIGIT = re.compile(r"([^0-9])([.,])")
_PERIOD_COMMA_BEFORE_NONDIGIT = re.compile(r"([.,])([^0-9])")
_DIGIT_DASH = re.compile(r"([0-9])(-)")


def mteval_words(text: str) -> list[str]:
    """The words mteval-v13a scores for `text` (its SGML reader, then its default tokenisation)."""
    t = _PERL_SPACE.sub(" ", text).replace("<skipped>", "")
    t = t.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    t = f" {t} ".translate(_ASCII_LOWER)
    t = _PUNCT.sub(r" \1 ", t)
    t = _PERIOD_COMMA_AFTER_NONDIGIT.sub(r"\1 \2 ", t)
    t = _PERIOD_COMMA_BEFORE_NONDIGIT.sub(r" \1 \2", t)
    t = _DIGIT_DASH.sub(r"\1 \2 ", t)
    return [w for w in _PERL_SPACE.split(t) if w]


# ---------------------------------------------------------------- BLEU / NIST (mteval-v13a-sig)
def ngrams(words: Sequence[str], max_n: int) -> Counter:
    """Counts of every n-gram (as a tuple) of `words`, n = 1..max_n."""
    return Counter(tuple(words[i:i + n]) for n in range(1, max_n + 1) for i in range(len(words) - n + 1))


def ngram_info(references: Sequence[Sequence[Sequence[str]]]) -> dict[tuple[str, ...], float]:
    """NIST information weights from every reference of the test set (tokenised):
    ``info(w1..wn) = -log2(count(w1..wn) / count(w1..wn-1))``, unigrams over the total word count."""
    counts: Counter = Counter()
    total = 0
    for refs in references:
        for words in refs:
            total += len(words)
            counts.update(ngrams(words, NIST_N))
    info = {}
    for gram, count in counts.items():
        prefix = gram[:-1]
        # The script's `$mgram ? … : …` reads the prefix string "0" (the token 0) as false, so a
        # bigram starting with the token "0" is divided by the total word count as well.
        denominator = counts[prefix] if prefix and prefix != ("0",) else total
        info[gram] = -math.log(count / denominator) / math.log(2)
    return info


def _closest(current: int, ref_len: int, hyp_len: int) -> int:
    """mteval's ``brevity_penalty_closest``: the closer length, the shorter on ties; empty refs skipped."""
    if ref_len == 0:
        return current
    if abs(hyp_len - ref_len) < abs(hyp_len - current) or (
        abs(hyp_len - ref_len) == abs(hyp_len - current) and ref_len < current
    ):
        return ref_len
    return current


@dataclass
class SegmentStats:
    """mteval's statistics of one segment (index n-1 holds n-grams)."""

    ref_length: int  # the closest reference length (BLEU)
    n_refs: int  # non-empty references (E2E's NIST length)
    ref_words: int
    matches: list[int]  # clipped n-gram matches
    hyp_ngrams: list[int]
    info: list[float]  # Σ info · clipped count of the matched n-grams


def segment_stats(hyp: Sequence[str], refs: Sequence[Sequence[str]], info: dict) -> SegmentStats:
    """The statistics of one hypothesis against its references (all tokenised)."""
    best: Counter = Counter()  # each n-gram's largest count in any one reference
    ref_length = None
    for words in refs:
        for gram, count in ngrams(words, NIST_N).items():
            best[gram] = max(best[gram], count)
        ref_length = len(words) if ref_length is None else _closest(ref_length, len(words), len(hyp))
    stats = SegmentStats(ref_length or 0, sum(1 for w in refs if w), sum(len(w) for w in refs),
                         [0] * NIST_N, [max(len(hyp) - n, 0) for n in range(NIST_N)], [0.0] * NIST_N)
    for gram, count in ngrams(hyp, NIST_N).items():
        if gram in best:
            clipped = min(count, best[gram])
            stats.matches[len(gram) - 1] += clipped
            stats.info[len(gram) - 1] += info[gram] * clipped
    return stats


def bleu_from_stats(ref_length: float, matches: Sequence[int], hyp_ngrams: Sequence[int]) -> float:
    """mteval-v13a's ``bleu_score`` (n = 1..4, with the script's smoothing of zero-match orders)."""
    bp = math.exp(min(0.0, 1 - ref_length / hyp_ngrams[0])) if hyp_ngrams[0] > 0 else 0.0
    smooth, log_sum = 1, 0.0
    for m, t in zip(matches[:BLEU_N], hyp_ngrams[:BLEU_N]):
        if t == 0:
            score = 0.0
        elif m == 0:
            smooth *= 2
            score = math.log(1 / (smooth * t))
        else:
            score = math.log(m / t)
        log_sum += score
    return math.exp(log_sum / BLEU_N) * bp


def nist_length_penalty(ratio: float) -> float:
    """``exp(-β log²(ratio))`` below 1, with β such that a ratio of 1.5 scores 0.5."""
    if ratio >= 1:
        return 1.0
    if ratio <= 0:
        return 0.0
    beta = -math.log(0.5) / math.log(1.5) / math.log(1.5)
    return math.exp(-beta * math.log(ratio) * math.log(ratio))


def nist_from_stats(avg_refs: float, info: Sequence[float], hyp_ngrams: Sequence[int], ref_words: int) -> float:
    """mteval's ``nist_score``: Σ_n info_n / #hyp n-grams, times the length penalty against
    ``ref_words / avg_refs`` (E2E: the average number of references per MR)."""
    score = 0.0
    for n in range(NIST_N):
        score += info[n] / max(hyp_ngrams[n], 1)
    return score * nist_length_penalty(hyp_ngrams[0] / (ref_words / avg_refs))


def bleu_nist(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, float, list[SegmentStats]]:
    """Corpus BLEU and NIST of mteval-v13a-sig (raw text in; its tokenisation applied), and the
    per-segment statistics."""
    hyps = [mteval_words(h) for h in hypotheses]
    refs = [[mteval_words(r) for r in rs] for rs in references]
    if not any(w for rs in refs for w in rs):
        raise KpeftError("BLEU/NIST: the references have no words")
    info = ngram_info(refs)
    segs = [segment_stats(h, rs, info) for h, rs in zip(hyps, refs)]
    matches, hyp_ngrams, info_sums = ([sum(col) for col in zip(*(getattr(s, key) for s in segs))]
                                      for key in ("matches", "hyp_ngrams", "info"))
    bleu = bleu_from_stats(sum(s.ref_length for s in segs), matches, hyp_ngrams)
    avg_refs = sum(s.n_refs for s in segs) / len(segs)
    nist = nist_from_stats(avg_refs, info_sums, hyp_ngrams, sum(s.ref_words for s in segs))
    return bleu, nist, segs


# ---------------------------------------------------------------- MS-COCO caption metrics
# Characters the PTB tokenizer (and the official line reader) treat as line breaks: inside one
# output they would shift every later line, so they become spaces (the official tool misaligns).
_LINE_BREAKS = re.compile("[\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")


def _java(what: str) -> str:
    java = shutil.which("java")
    if java is None:
        raise KpeftError(
            f"{what} needs a Java runtime (Debian/Ubuntu: apt-get install default-jre-headless) so that "
            "`java` is on PATH; or pass task.options.coco_metrics=false (BLEU and NIST only)"
        )
    return java


def _ptb_module() -> Any:
    try:
        from pycocoevalcap.tokenizer import ptbtokenizer
    except ModuleNotFoundError:
        raise KpeftError("the E2E metrics METEOR, ROUGE-L and CIDEr need `pip install pycocoevalcap`; "
                         "or pass task.options.coco_metrics=false (BLEU and NIST only)") from None
    return ptbtokenizer


def ptb_tokenize(texts: Sequence[str]) -> list[str]:
    """``pycocoevalcap``'s ``PTBTokenizer``: Stanford CoreNLP 3.4.1 ``PTBTokenizer -preserveLines
    -lowerCase`` over all texts at once (one per line), then its punctuation tokens dropped.
    (Same call as the library's class, with the temporary file outside the package folder.)"""
    if not texts:
        return []
    ptb = _ptb_module()
    jar = Path(ptb.__file__).parent / ptb.STANFORD_CORENLP_3_4_1_JAR
    with tempfile.TemporaryDirectory(prefix="kpeft-ptb-") as tmp:
        path = Path(tmp) / "sentences.txt"
        path.write_bytes("\n".join(_LINE_BREAKS.sub(" ", t) for t in texts).encode("utf-8"))
        cmd = [_java("the PTB tokenizer"), "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer",
               "-preserveLines", "-lowerCase", str(path)]
        proc = subprocess.run(cmd, capture_output=True, check=False)
    lines = proc.stdout.decode("utf-8").split("\n")
    if proc.returncode != 0 or len(lines) < len(texts):
        tail = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise KpeftError(f"the PTB tokenizer failed: {tail[-1] if tail else f'{len(lines)} lines for {len(texts)} texts'}")
    drop = set(ptb.PUNCTUATIONS)
    return [" ".join(w for w in line.rstrip().split(" ") if w not in drop) for line in lines[: len(texts)]]


def meteor_jar(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """METEOR 1.5 (``-l en -norm``) of PTB-tokenised texts, statistics pooled over the corpus."""
    from kpeft.metrics.webnlg import MeteorJar

    _java("METEOR 1.5")
    with MeteorJar() as jar:
        # pycocoevalcap's Meteor._stat cleans the hypothesis this way (references go as they are)
        stats = [jar.stats(h.replace("|||", "").replace("  ", " "), r) for h, r in zip(hyps, refs)]
        return jar.aggregate(stats)


def coco_metrics(hypotheses: Sequence[str], references: Sequence[Sequence[str]], meteor: str = "jar") -> tuple[dict, dict]:
    """(corpus scores, per-segment score lists) of METEOR, ROUGE-L and CIDEr on raw texts."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    flat = [r for rs in references for r in rs]
    tokens = iter(ptb_tokenize(flat))  # references and outputs are two tokenizer runs, as officially
    gts = {i: [next(tokens) for _ in rs] for i, rs in enumerate(references)}
    res = {i: [h] for i, h in enumerate(ptb_tokenize(list(hypotheses)))}
    scores: dict[str, float] = {}
    if meteor == "jar":
        scores["meteor"] = meteor_jar([res[i][0] for i in res], [gts[i] for i in gts])
    elif meteor == "approx":
        from kpeft.metrics.webnlg import meteor_approx

        scores["meteor_approx"] = meteor_approx([res[i][0] for i in res], [gts[i] for i in gts])
    rouge, rouge_each = Rouge().compute_score(gts, res)
    cider, cider_each = Cider().compute_score(gts, res)
    scores.update(rouge_l=float(rouge), cider=float(cider))
    return scores, {"rouge_l": [float(x) for x in rouge_each], "cider": [float(x) for x in cider_each]}


# ---------------------------------------------------------------- the challenge's report
def score_corpus(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]], meteor: str = "jar", coco: bool = True
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """The official report ``{"bleu", "nist", "meteor", "rouge_l", "cider"}`` of raw system outputs
    (one per MR) against each MR's raw references, and per-MR scores (mteval segment BLEU, ROUGE-L,
    CIDEr) for significance tests. ``meteor``: ``jar`` (official), ``approx`` (reported as
    ``meteor_approx``) or ``off``; ``coco=False`` gives BLEU and NIST only (no Java needed)."""
    if meteor not in METEOR_MODES:
        raise KpeftError(f"unknown METEOR mode '{meteor}'; valid: {', '.join(METEOR_MODES)}")
    if len(hypotheses) != len(references):
        raise KpeftError(f"{len(hypotheses)} outputs for {len(references)} E2E MRs: give one output line per MR")
    if not hypotheses:
        raise KpeftError("E2E metrics of an empty corpus")
    if any(not rs for rs in references):
        raise KpeftError("an E2E MR has no reference")
    hyps = [h.strip() for h in hypotheses]  # the official reader strips every output line
    bleu, nist, segs = bleu_nist(hyps, references)
    scores: dict[str, float] = {"bleu": bleu, "nist": nist}
    rows = [{"bleu": bleu_from_stats(s.ref_length, s.matches, s.hyp_ngrams)} for s in segs]
    if coco:
        more, each = coco_metrics(hyps, references, meteor)
        scores.update(more)
        for name, values in each.items():
            for row, v in zip(rows, values):
                row[name] = v
    return scores, rows


def evaluate(hypotheses: Sequence[str], references: Sequence[Sequence[str]], meteor: str = "jar",
             coco: bool = True) -> dict[str, float]:
    """The official corpus scores (see :func:`score_corpus`)."""
    return score_corpus(hypotheses, references, meteor, coco)[0]
