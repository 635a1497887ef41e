"""Budget-aware ending of grammar-constrained JSON: close what is open before `max_new_tokens` runs out.

A small model may run on inside a JSON string until the budget ends, and the cut text is invalid JSON
or an empty tool call. Near the end of the budget, `Closer` estimates how many tokens the shortest valid
ending still takes: it forks the grammar matcher and plays a closing policy forward, taking forced text
(xgrammar's jump-forward string) as it comes and otherwise the allowed token that closes the most (a
string's quote, then arrays and objects, shortest values for required keys). When the tokens left are
just enough for that ending, decoding follows the same policy for real. The text is cut short, not
broken: the output stays valid against the grammar.
"""

from __future__ import annotations

import torch

# Token texts the closing policy may choose (stripped of spaces): JSON structure, short values.
_STRUCTURE = set('"{}[]:,')
_NUMBER = set("0123456789-.")
_VALUES = {"true", "false", "null"}


class Candidates:
    """The tokens the closing policy may choose: made only of JSON structure and digits, or a literal value.

    ids [C]; texts; change[s] [C]: how `JsonDepth.open` changes when the token's text is fed with a string
    open (s=1) or not (s=0), on a deep enough stack (the grammar never lets a token close what is not open);
    value [C]: 1 for tokens with number characters or a literal (they may go on forever: "0000"), 0 for
    pure structure, which the policy prefers at equal change (it ends a number with "," or "}").
    """

    def __init__(self, token_texts: list[str]):
        ids, self.texts, value = [], [], []
        for i, t in enumerate(token_texts):
            s = t.strip()
            if s and (set(s) <= _STRUCTURE | _NUMBER or s in _VALUES):
                ids.append(i)
                self.texts.append(t)
                value.append(int(not set(s) <= _STRUCTURE))
        self.ids = torch.tensor(ids, dtype=torch.long)
        self.value = torch.tensor(value, dtype=torch.long)
        change = []
        for in_string in (False, True):
            row = []
            for t in self.texts:
                d = JsonDepth()
                d.stack, d.in_string, d.started = ["{"] * 64, in_string, True
                before = d.open
                d.feed(t)
                row.append(d.open - before)
            change.append(row)
        self.change = torch.tensor(change, dtype=torch.long)


class JsonDepth:
    """What is open in a stretch of JSON text: the container stack and whether a string is open. Text
    before the first `{` or `[` (a tool-call block's head) is skipped."""

    def __init__(self):
        self.stack: list[str] = []
        self.in_string = self.escape = self.started = False
        self.string = ""  # the open string's text so far

    def copy(self) -> JsonDepth:
        other = JsonDepth()
        other.stack, other.in_string, other.escape, other.started = (list(self.stack), self.in_string,
                                                                     self.escape, self.started)
        other.string = self.string
        return other

    def feed(self, text: str) -> None:
        for ch in text:
            if not self.started:
                if ch in "{[":
                    self.started = True
                else:
                    continue
            if self.in_string:
                if self.escape:
                    self.escape = False
                elif ch == "\\":
                    self.escape = True
                elif ch == '"':
                    self.in_string = False
                    continue
                self.string += ch
            elif ch == '"':
                self.in_string, self.string = True, ""
            elif ch in "{[":
                self.stack.append(ch)
            elif ch in "}]" and self.stack:
                self.stack.pop()

    def looping(self, min_chars: int = 12, max_period: int = 16) -> bool:
        """The open string ends in a loop: one stretch of 1 to `max_period` characters repeated over its last
        max(min_chars, 3 periods) characters ("0000000000000", "7000-7000-7000-")."""
        s = self.string
        for p in range(1, max_period + 1):
            k = max(min_chars, 3 * p)
            if len(s) >= k and s[-k:] == (s[-p:] * (k // p + 1))[-k:]:
                return True
        return False

    @property
    def open(self) -> int:
        """How many things must still close: the open string, if any, and every open container."""
        return int(self.in_string) + len(self.stack)


def _allowed(bitmask: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[len(ids)] bool: which token ids the xgrammar bitmask ([1, words] int32) allows."""
    words = bitmask[0, ids >> 5]
    return ((words >> (ids & 31)) & 1).bool()


def _first_allowed(bitmask: torch.Tensor) -> int | None:
    nz = torch.nonzero(bitmask[0]).flatten()
    if not nz.numel():
        return None
    w = int(nz[0])
    word = int(bitmask[0, w]) & 0xFFFFFFFF
    return 32 * w + ((word & -word).bit_length() - 1)


class Closer:
    """Per-request closing policy over a `structured.Constraint`.

    candidates: the tokenizer's `Candidates`; token_text: id -> text; encode: text -> ids; horizon: the
    ending is estimated only once at most this many tokens are left. budget: end within the budget;
    string_guard: close a string that loops (`JsonDepth.looping`). restart_at: text that opens a fresh
    JSON stretch (a tool call's opening tag, `structured.CALL_OPEN`).
    """

    def __init__(self, constraint, candidates: Candidates, token_text, encode, horizon: int = 48,
                 budget: bool = True, string_guard: bool = True, restart_at: str | None = None):
        self.constraint = constraint
        self.cand = candidates
        self.token_text, self.encode = token_text, encode
        self.horizon = horizon
        self.budget, self.string_guard = budget, string_guard
        self.depth = JsonDepth()
        self.restart_at = restart_at
        self.closing = False  # once on, it stays on
        self.guarded = 0  # strings closed by the guard

    def observe(self, token: int) -> None:
        """Feed an accepted token (`restart_at` starts a fresh JSON stretch)."""
        text = self.token_text(token)
        if self.restart_at and self.restart_at in text:
            self.depth = JsonDepth()
            text = text.split(self.restart_at)[-1]
        self.depth.feed(text)

    def choose(self, tokens_left: int, logits: torch.Tensor | None = None) -> int | None:
        """The token to take now (None: let the sampler choose under the mask). Call after `mask`; logits
        [vocab] break ties between equally closing tokens."""
        if self.budget and not self.closing and tokens_left <= self.horizon:
            need = self._ending_tokens(tokens_left)
            self.closing = need is None or tokens_left <= need + 1  # + 1: room for the stop token
        if self.closing:
            return self._policy(self.constraint.matcher, self.constraint.bitmask, self.depth, logits)
        if self.string_guard and self.depth.in_string and self.depth.looping():
            tok = self._pick(self.constraint.bitmask, self.depth, logits, exactly=-1)  # close this string only
            self.guarded += tok is not None
            return tok
        return None

    def _policy(self, matcher, bitmask: torch.Tensor, depth: JsonDepth, logits: torch.Tensor | None) -> int | None:
        """The closing policy's token: forced text (the grammar's jump-forward string) as the tokenizer
        splits it, else the allowed candidate that closes the most, else any allowed token."""
        forced = matcher.find_jump_forward_string()
        if forced:
            first = self.encode(forced)[:1]
            if first and bool(_allowed(bitmask, torch.tensor(first))[0]):
                return first[0]
        tok = self._pick(bitmask, depth, logits)
        return tok if tok is not None else _first_allowed(bitmask)

    def _pick(self, bitmask: torch.Tensor, depth: JsonDepth, logits: torch.Tensor | None = None,
              exactly: int | None = None) -> int | None:
        """The allowed candidate after which the least is open (or, with `exactly`, that changes what is open
        by exactly that much), structure before values; ties: the likeliest under `logits`, else the lowest
        id. None if none qualifies."""
        ok = _allowed(bitmask, self.cand.ids)
        change = self.cand.change[int(depth.in_string)]
        if exactly is not None:
            ok &= change == exactly
        if not bool(ok.any()):
            return None
        score = 2 * change + self.cand.value
        best = ok & (score == score.masked_fill(~ok, 1 << 20).min())
        if logits is None:
            return int(self.cand.ids[int(best.nonzero()[0])])
        scores = logits[self.cand.ids].masked_fill(~best, float("-inf"))
        return int(self.cand.ids[int(scores.argmax())])

    def _ending_tokens(self, limit: int) -> int | None:
        """Tokens the closing policy takes to complete the grammar from here, played forward on a fork of
        the matcher (ties broken by the lowest id); None if more than `limit`."""
        sim = self.constraint.fork()
        depth = self.depth.copy()
        bitmask = self.constraint.new_bitmask()
        for n in range(limit + 1):
            if sim.is_completed() or sim.is_terminated():
                return n
            sim.fill_next_token_bitmask(bitmask)
            tok = self._policy(sim, bitmask, depth, None)
            if tok is None or not sim.accept_token(tok):
                return None
            depth.feed(self.token_text(tok))
        return None
