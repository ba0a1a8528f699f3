"""Tasks whose data kpeft generates itself, so the demo and the tests run offline.

* ``demo_sentiment`` — short reviews from templates and word lists, two classes, with negation
  ("was not dull" is positive) and contrast ("A was dull, but B was superb" takes the second
  clause), so a model must read word order, not only count words. Text: needs a tokenizer.
* ``demo_reverse`` — token-level sequence reversal (``a b c <sep> c b a <eos>``), tokenizer-free
  (ids drawn from a small symbol range), as a causal LM (``kind=causal_lm``: loss only on the
  reversed half + eos) or as text-to-text (``kind=seq2seq``). Metric: target-token accuracy.
"""

from __future__ import annotations

import random

from kpeft.errors import KpeftError
from kpeft.tasks import lengths
from kpeft.tasks.base import IGNORE, Example, Task

SUBJECTS = [
    "the movie", "this film", "the plot", "the acting", "the soundtrack", "the ending", "the cast",
    "the script", "the dialogue", "the camera work", "the story", "the lead performance",
]
POSITIVE = [
    "wonderful", "brilliant", "delightful", "superb", "moving", "charming", "excellent", "gripping",
    "hilarious", "beautiful", "clever", "touching", "fresh", "stunning",
]
NEGATIVE = [
    "dull", "awful", "boring", "clumsy", "tedious", "dreadful", "weak", "lifeless", "predictable",
    "terrible", "bland", "messy", "shallow", "forgettable",
]
ADVERBS = ["", "really ", "truly ", "rather ", "quite ", "utterly "]
CLAUSES = ["{s} was {a}{j}", "{s} is {a}{j}", "{s} felt {a}{j}", "i found {s} {a}{j}", "{s} seemed {a}{j}"]
NEGATED = ["{s} was not {j}", "{s} is not {a}{j}", "i did not find {s} {j}", "{s} never felt {j}"]


def _clause(rng: random.Random) -> tuple[str, int]:
    label = rng.randint(0, 1)
    subject = rng.choice(SUBJECTS)
    negate = rng.random() < 0.3
    words = (POSITIVE if label != negate else NEGATIVE)  # negation flips the adjective's polarity
    template = rng.choice(NEGATED if negate else CLAUSES)
    return template.format(s=subject, a=rng.choice(ADVERBS), j=rng.choice(words)), label


def sentiment_example(rng: random.Random) -> tuple[str, int]:
    """One generated review and its label (1 = positive)."""
    text, label = _clause(rng)
    if rng.random() < 0.35:  # contrast: the clause after "but" decides
        second, label = _clause(rng)
        text = f"{text}, but {second}"
    return text + rng.choice([".", "!", "."]), label


class DemoSentiment(Task):
    """Generated two-class sentiment reviews (see module docstring)."""

    def load_splits(self) -> dict[str, list[Example]]:
        opts = self.cfg.options
        rng = random.Random(opts.get("data_seed", 0))
        sizes = {"train": opts.get("n_train", 2000), "validation": opts.get("n_val", 300), "test": opts.get("n_test", 600)}
        splits, counts = {}, {}
        for split, n in sizes.items():
            rows = [sentiment_example(rng) for _ in range(n)]
            enc = self.tokenize_fitted([t for t, _ in rows], None, split, counts)
            splits[split] = [
                {"input_ids": ids, "label": label, "text": text}
                for ids, (text, label) in zip(enc, rows)
            ]
        lengths.warn_truncated(counts, self.input_limit())
        return splits


class DemoReverse(Task):
    """Reverse a random symbol sequence (see module docstring); no tokenizer needed."""

    needs_tokenizer = False
    EOS, SEP, FIRST_SYMBOL = 2, 3, 4

    def load_splits(self) -> dict[str, list[Example]]:
        opts = self.cfg.options
        rng = random.Random(opts.get("data_seed", 0))
        n_sym, length = opts.get("n_symbols", 16), opts.get("length", 6)
        self.check_fits(int(length))
        sizes = {"train": opts.get("n_train", 512), "validation": opts.get("n_val", 64), "test": opts.get("n_test", 128)}
        splits = {}
        for split, n in sizes.items():
            rows = []
            for _ in range(n):
                src = [rng.randrange(self.FIRST_SYMBOL, self.FIRST_SYMBOL + n_sym) for _ in range(length)]
                rows.append(self.encode(src))
            splits[split] = rows
        return splits

    def check_fits(self, length: int) -> None:
        """A reversal cannot be truncated (the target is the whole source): an example longer than
        the model's positions is refused, naming the longest ``task.options.length`` that fits."""
        size = length + 1 if self.kind == "seq2seq" else 2 * length + 2
        if self.max_positions is None or size <= self.max_positions:
            return
        most = self.max_positions - 1 if self.kind == "seq2seq" else (self.max_positions - 2) // 2
        raise KpeftError(f"task.options.length={length} makes {size}-token examples, more than the model's "
                         f"{self.max_positions} positions; use task.options.length={most} or less")

    def encode(self, src: list[int]) -> Example:
        tgt = src[::-1] + [self.EOS]
        if self.kind == "seq2seq":
            return {"input_ids": src + [self.EOS], "labels": tgt}
        ids = src + [self.SEP] + tgt
        return {"input_ids": ids, "labels": [IGNORE] * (len(src) + 1) + tgt}
