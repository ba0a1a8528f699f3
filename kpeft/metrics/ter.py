"""TER exactly as tercom 0.7.25 computes it (Snover et al. 2006; the WebNLG 2017 challenge's scorer).

TER = (shifts + word edit distance after the shifts) / reference length. The best set of shifts
is NP-hard to find, so tercom searches greedily, and its answer depends on the details of that
search. ``sacrebleu``'s port (``sacrebleu.metrics.lib_ter``) departs from these details, which
changes the edit count of some segments: it bands the edit-distance matrix around the diagonal
(±25) where tercom prunes by cost, ranks equal-gain shifts by hypothesis target position where
tercom keeps its generation order, reads a target inside the moved span one word further right,
limits the shift distance by reference-vs-hypothesis index, and stops after 1,000 shift
candidates per segment (``tests/test_metrics_webnlg.py`` has a segment for the first and the
third). This module follows tercom (its default options: case-folded, no normalisation,
whitespace tokens):

* **edit distance** — word Levenshtein (substitution, insertion, deletion: 1) filled hypothesis
  word by hypothesis word (a column each); a cell is not expanded when its cost exceeds the best
  diagonal cost reaching its column by more than the beam (20); each column scans only the rows
  between the first and the last row expanded in the column before (plus those reached by
  deletions); equal costs keep match/substitution, then insertion, then deletion — which fixes
  the alignment that the shift search reads;
* **shift candidates** — a hypothesis span ``[start, end]`` (≤ 10 words) that occurs in the
  reference at ``moveto`` is tried when it holds a hypothesis error, the reference span holds a
  reference error, and the hypothesis position aligned to ``moveto`` lies outside the span and
  within 50 words; the span may be moved after the hypothesis word aligned to ``moveto + off``,
  ``off = -1 … len-1`` (to the front when ``moveto = 0, off = -1``), except a target equal to
  ``start`` or, for ``off ≠ 0``, equal to the target of ``off = 0``. A span grows word by word
  while it occurs in the reference and it has no error or some target passes the position test;
* **choice** — spans from the longest down, each length in order of start, ``moveto``, offset;
  the first shift whose new edit distance plus its cost (1) is not above the current one is
  taken, a later one only when strictly better; a length is not tried once the best net gain
  so far reaches twice that length (tercom's bound); shifts repeat until none is taken. A target
  inside the span moves the span right by ``newloc - start`` words (tercom's reading).

Multiple references (:func:`multi_reference_ter`): the fewest edits over the references (the
first on ties) and the *average* reference length, as tercom reports them.
"""

from __future__ import annotations

from collections.abc import Sequence

from kpeft.errors import KpeftError

BEAM_WIDTH = 20
MAX_SHIFT_SIZE = 10
MAX_SHIFT_DIST = 50
_INF = 999999


class EditDistance:
    """tercom's beam-pruned word edit distance to one reference. The columns of hypothesis
    prefixes are cached in a trie: the shifted hypotheses of a search share long prefixes."""

    def __init__(self, ref: Sequence[str]):
        self.ref = list(ref)
        n = len(self.ref)
        first = [0] + [-1] * n
        # state of the column about to be processed: (S, P, best cost reaching it, first row, last row)
        self._root = (first, ["0"] * (n + 1), _INF, 0, 0)
        self._trie: dict = {}

    def _column(self, word: str, state: tuple) -> tuple[tuple, tuple]:
        """Process one column that is not the last: its final (S, P) and the next column's state.
        Costs are ints; -1 marks a cell not reached yet."""
        ref, n = self.ref, len(self.ref)
        s, p, last_best, first_good, last_good = state
        s, p = s[:], p[:]
        ns, np_ = [-1] * (n + 1), ["0"] * (n + 1)
        limit = last_best + BEAM_WIDTH
        best, new_first, new_last = _INF, -1, -1
        i = first_good
        while i <= n and i <= last_good:
            score = s[i]
            if score < 0 or score > limit:
                i += 1
                continue
            if new_first == -1:
                new_first = i
            up = score + 1
            if i < n:
                diag = ns[i + 1]
                if ref[i] == word:
                    if diag == -1 or score < diag:
                        ns[i + 1], np_[i + 1] = score, " "
                    if score < best:
                        best = score
                elif diag < 0 or up < diag:
                    ns[i + 1], np_[i + 1] = up, "S"
                    if up < best:
                        best = up
                below = s[i + 1]
                if below < 0 or below > up:
                    s[i + 1], p[i + 1] = up, "D"
                    if i >= last_good:
                        last_good = i + 1
            new_last = i + 1
            right = ns[i]
            if right < 0 or right > up:
                ns[i], np_[i] = up, "I"
            i += 1
        return (s, p), (ns, np_, best, max(new_first, 0), new_last)

    def _last_column(self, state: tuple) -> tuple:
        """The final column: no beam and nothing to its right; only deletions run down it."""
        n = len(self.ref)
        s, p, _, first_good, last_good = state
        s, p = s[:], p[:]
        i = first_good
        while i < n and i <= last_good:
            score = s[i]
            if score >= 0 and (s[i + 1] < 0 or s[i + 1] > score + 1):
                s[i + 1], p[i + 1] = score + 1, "D"
                if i >= last_good:
                    last_good = i + 1
            i += 1
        return s, p

    def __call__(self, hyp: Sequence[str]) -> tuple[float, str]:
        """(edit distance, alignment path) of `hyp`; the path uses tercom's symbols: ``' '``
        match, ``S`` substitution, ``I`` a hypothesis word inserted, ``D`` a reference word deleted."""
        columns, node, state = [], self._trie, self._root
        for word in hyp:  # the longest cached prefix
            hit = node.get(word)
            if hit is None:
                break
            node, final, state = hit
            columns.append(final)
        for word in hyp[len(columns):]:
            final, state = self._column(word, state)
            child: dict = {}
            node[word] = (child, final, state)
            node = child
            columns.append(final)
        columns.append(self._last_column(state))
        return columns[-1][0][len(self.ref)], _trace(columns, len(self.ref), len(hyp))


def _trace(columns: list, n_ref: int, n_hyp: int) -> str:
    """The alignment path from (n_ref, n_hyp) back to the origin."""
    path = []
    i, j = n_ref, n_hyp
    while i > 0 or j > 0:
        op = columns[j][1][i]
        path.append(op)
        if op in (" ", "S"):
            i, j = i - 1, j - 1
        elif op == "D":
            i -= 1
        elif op == "I":
            j -= 1
        else:  # pragma: no cover - every reachable cell has a predecessor
            raise RuntimeError(f"TER: no alignment path through ({i}, {j})")
    return "".join(reversed(path))


def _errors(path: str, n_hyp: int, n_ref: int) -> tuple[list[bool], list[bool], list[int]]:
    """Which hypothesis / reference words are wrong, and the hypothesis position aligned to each
    reference word (the last hypothesis word before it for a deletion, -1 if none)."""
    herr, rerr, ralign = [False] * n_hyp, [False] * n_ref, [0] * n_ref
    h = r = -1
    for op in path:
        if op in (" ", "S"):
            h, r = h + 1, r + 1
            herr[h] = rerr[r] = op == "S"
            ralign[r] = h
        elif op == "I":
            h += 1
            herr[h] = True
        else:
            r += 1
            rerr[r] = True
            ralign[r] = h
    return herr, rerr, ralign


def _ref_spans(ref: Sequence[str], hyp_words: set) -> dict[tuple, list[int]]:
    """Reference n-grams (up to MAX_SHIFT_SIZE + 1 words) made only of hypothesis words → their
    start positions, ascending."""
    spans: dict[tuple, list[int]] = {}
    for start in range(len(ref)):
        end = start
        while end < len(ref) and end - start <= MAX_SHIFT_SIZE and ref[end] in hyp_words:
            spans.setdefault(tuple(ref[start:end + 1]), []).append(start)
            end += 1
    return spans


def _candidates(hyp: list[str], spans: dict, herr, rerr, ralign) -> list[list[tuple[int, int, int]]]:
    """tercom's shift candidates ``(start, end, newloc)``, grouped by span length - 1, each group in
    generation order (see the module docstring)."""
    groups: list[list[tuple[int, int, int]]] = [[] for _ in range(MAX_SHIFT_SIZE + 1)]
    for start in range(len(hyp)):
        first = spans.get((hyp[start],))
        if first is None or not any(start != ralign[m] and ralign[m] - start <= MAX_SHIFT_DIST
                                    and start - ralign[m] - 1 <= MAX_SHIFT_DIST for m in first):
            continue
        end = start
        while end < len(hyp) and end < start + MAX_SHIFT_SIZE:
            where = spans.get(tuple(hyp[start:end + 1]))
            if where is None:
                break
            if not any(herr[start:end + 1]):
                end += 1
                continue
            grow = False
            for moveto in where:
                r = ralign[moveto]
                if r == start or start <= r <= end or r - start > MAX_SHIFT_DIST or start - r > MAX_SHIFT_DIST:
                    continue
                grow = True
                if not any(rerr[moveto:moveto + end - start + 1]):
                    continue
                for off in range(-1, end - start + 1):
                    if off == -1 and moveto == 0:
                        groups[end - start].append((start, end, -1))
                    elif start != ralign[moveto + off] and (off == 0 or ralign[moveto + off] != r):
                        groups[end - start].append((start, end, ralign[moveto + off]))
            if not grow:
                break
            end += 1
    return groups


def shifted(words: list[str], start: int, end: int, newloc: int) -> list[str]:
    """tercom's shift: ``words[start..end]`` moved after position `newloc` (-1: to the front; a
    `newloc` inside the span moves it right by ``newloc - start`` words)."""
    block = words[start:end + 1]
    if newloc == -1:
        return block + words[:start] + words[end + 1:]
    if newloc < start:
        return words[:newloc + 1] + block + words[newloc + 1:start] + words[end + 1:]
    if newloc > end:
        return words[:start] + words[end + 1:newloc + 1] + block + words[newloc + 1:]
    k = end + 1 + newloc - start
    return words[:start] + words[end + 1:k] + block + words[k:]


def _best_shift(cur: list[str], distance: EditDistance, spans: dict, cur_edits: float, path: str):
    """The shift tercom takes from `cur` (None when none helps): (shifted words, edits, path)."""
    herr, rerr, ralign = _errors(path, len(cur), len(distance.ref))
    groups = _candidates(cur, spans, herr, rerr, ralign)
    best = None  # (words, edits, path)
    best_total = cur_edits  # edits + shift cost of the best so far (no shift: cost 0)

    def hopeless(size: int) -> bool:  # tercom's cut: no shift of size+1 words can do better
        fixed, bound = cur_edits - best_total, 2 * (size + 1)
        return fixed > bound or (best is not None and fixed == bound)

    for size in range(MAX_SHIFT_SIZE, -1, -1):
        if hopeless(size):
            break
        for start, end, newloc in groups[size]:
            if hopeless(size):
                break
            words = shifted(cur, start, end, newloc)
            edits, new_path = distance(words)
            gain = best_total - (edits + 1)
            if gain > 0 or (best is None and gain == 0):
                best, best_total = (words, edits, new_path), edits + 1
    return best


def ter_edits(hyp: Sequence[str], ref: Sequence[str]) -> float:
    """tercom's number of edits (shifts + edit distance after them) of one hypothesis against one
    reference, both lists of tokens."""
    hyp, ref = list(hyp), list(ref)
    if not hyp or not ref:  # all deletions or all insertions
        return float(len(hyp) + len(ref))
    distance = EditDistance(ref)
    spans = _ref_spans(ref, set(hyp))
    edits, path = distance(hyp)
    shifts = 0
    while True:
        step = _best_shift(hyp, distance, spans, edits, path)
        if step is None:
            break
        hyp, edits, path = step
        shifts += 1
    return float(edits + shifts)


def multi_reference_ter(hypothesis: str, references: Sequence[str]) -> tuple[float, float]:
    """(fewest edits over `references`, their average length) of a whitespace-tokenised,
    case-folded hypothesis: tercom's statistics of one segment."""
    hyp = hypothesis.lower().split()
    refs = [r.lower().split() for r in references]
    if not refs:
        raise KpeftError("a TER segment has no (non-empty) reference; give every entry at least one")
    edits = min(ter_edits(hyp, r) for r in refs)
    return edits, sum(len(r) for r in refs) / len(refs)
