"""The field's scoring conventions, per row: each peer's published rules, re-implemented
here from their documented behaviour so that a medcap run can be read in their tables
(datasets/README.md has each rule in full, and which number compares with which table):

* ``medevalkit``: MedEvalKit's reply parsing (``\boxed{}``/``<answer>`` unwrapped, the
  space after an answer marker kept), its yes/no rule (SLAKE's capitalised answers fall
  to exact match), exact match for open answers, its choice matcher;
* ``llava_med``: LLaVA-Med's normalisation (articles, number words) and open recall with
  uncapped repeats; closed right when the reply holds yes/no and the answer;
* ``huatuo``: HuatuoGPT-Vision's choice matching: letter, then option text, then difflib.

A peer's crash (an empty reply, an answer that is no option) scores the row wrong; a
peer's miscount (rows dropped from a denominator) is not reproduced.

In this file: shared text helpers, then each convention's rules, then ``row_cells``
(a row's cells, by the file's ``suite`` prefix) and ``headlines`` (a file's numbers).
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from typing import Any, Dict, List, Mapping, Optional, Sequence

LETTERS = ("A", "B", "C", "D")
CONVENTIONS = ("medcap", "medevalkit", "llava_med", "huatuo")
# per-row columns of the scored files (empty where a convention does not score a row)
BENCHMARK_COLUMNS = ("medevalkit_correct", "llava_med_correct", "llava_med_recall", "huatuo_predict", "huatuo_correct")
CHOICE_COLUMNS = ("medevalkit_correct", "huatuo_predict", "huatuo_correct")  # OmniMedVQA's scored file
YES_NO = ("yes", "no")


def present_options(row: Mapping[str, str]) -> Dict[str, str]:
    """The options a row offers, letter -> text, empty ones left out."""
    return {L: row.get(f"option_{L}", "") or "" for L in LETTERS if (row.get(f"option_{L}", "") or "") != ""}


def _boxed(text: str) -> Optional[str]:
    """The content of the last ``\\boxed{...}`` (braces balanced), stripped; None when there
    is none or it is never closed (and, as MedEvalKit's helper signals absence with the
    string "None", when its content is exactly that)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, body = 0, text[start + len("\\boxed{"):]
    for i, ch in enumerate(body):
        depth += (ch == "{") - (ch == "}")
        if depth < 0:
            content = body[:i].strip()
            return None if content == "None" else content
    return None


def _tagged(text: str, tag: str) -> str:
    """Every ``<tag>...</tag>`` span joined by spaces; the whole text when there is none."""
    if not text:
        return ""
    spans, pos = [], 0
    opening, closing = f"<{tag}>", f"</{tag}>"
    while (start := text.find(opening, pos)) >= 0:
        end = text.find(closing, start + len(opening))
        if end < 0:
            break
        spans.append(text[start + len(opening):end])
        pos = end + len(closing)
    joined = " ".join(spans).strip()
    return joined or text


# ---- medevalkit

MEK_MARKERS = ("**answer**:", "**answer**", "*answer*:", "**answer:**", "answer is", "answer:", "答案:",
               "final answer", "final answer is")


def mek_unwrap(reply: str) -> str:
    """The answer inside ``\\boxed{}``, else inside ``<answer>`` tags, else the reply."""
    boxed = _boxed(reply)
    if boxed is not None:
        return boxed
    return _tagged(reply, "answer") if "<answer>" in reply else reply


def mek_parse(reply: str) -> str:
    """Lower-cased; a reply that mentions "boxed" is replaced by its boxed content ("None"
    when it has none, as there), else ``<answer>`` content; then cut after each marker."""
    text = reply.lower()
    if "boxed" in text:
        boxed = _boxed(text)
        text = "None" if boxed is None else boxed
    elif "<answer>" in text:
        text = _tagged(text, "answer")
    for marker in MEK_MARKERS:
        if marker in text:
            text = text.split(marker)[-1]
    return text


def mek_yes_no(answer: str, reply: str) -> int:
    text = mek_parse(reply).replace("\n", "").replace(".", "")
    return int((("yes" in text) != ("no" in text)) and answer.lower() in text)


def mek_equal(answer: str, reply: str, *, flatten: bool) -> int:
    """Closed non-yes/no answers (full stops and newlines removed) and open ones (as parsed)."""
    text = mek_parse(reply)
    if flatten:
        text = text.replace("\n", "").replace(".", "")
    return int(text == answer.lower())


def mek_choice(choices: Sequence[str], answer: str, reply: str) -> int:
    """MedEvalKit's multiple-choice matcher: the reply (or its first / last paragraph when that
    is a bare letter) parsed, then read as a letter, as an option's text, or matched to the
    most similar option by difflib (ties to the earlier)."""
    letters = [chr(ord("a") + i) for i in range(len(choices))]
    text = reply.lower()
    head, tail = text.split("\n\n")[0], text.split("\n\n")[-1].split(".")[0]
    text = head if head in letters else (tail if tail in letters else text)
    text = mek_parse(text).strip().lower().replace("\n", "")
    lowered = [c.lower() for c in choices]
    said, want = text.split(".")[0].split(":")[-1], answer.strip().lower()
    if said == want:
        return 1
    if said in letters:
        return int(lowered[letters.index(said)] == want)
    if said in lowered:
        return int(want in letters and said == lowered[letters.index(want)])
    ratios = [difflib.SequenceMatcher(None, c, text).ratio() for c in lowered]
    best = next((i for i, r in enumerate(ratios) if r == max(ratios) and r > 0), 0) if ratios else 0
    return int(bool(letters) and (letters[best] == want or lowered[best] == want))


def medevalkit_correct(row: Mapping[str, str], suite: str) -> Optional[int]:
    """A row under MedEvalKit's rules for ``suite`` (a file prefix); None when not scored."""
    kind, answer, reply = row.get("answer_type", ""), row.get("output", ""), row.get("generated", "") or ""
    if suite == "omnimedvqa" or kind == "choice":
        return _mek_choice_row(row, suite)
    if answer == "" or kind not in ("closed", "open"):
        return None
    reply = mek_unwrap(reply)
    if suite == "slake":  # SLAKE's answers as written: "Yes"/"No" are not read as yes/no
        if kind == "open":
            return mek_equal(answer, reply, flatten=False)
        return mek_yes_no(answer, reply) if answer in YES_NO else mek_equal(answer, reply, flatten=True)
    answer, reply = answer.lower().strip(), reply.lower().strip()
    if kind == "closed":
        return mek_yes_no(answer, reply) if answer in YES_NO else mek_equal(answer, reply, flatten=True)
    return mek_equal(answer, reply, flatten=False)


def _mek_choice_row(row: Mapping[str, str], suite: str) -> Optional[int]:
    options, answer = present_options(row), row.get("output", "")
    if answer == "" or not options:
        return None
    if suite == "pmcvqa":  # PMC-VQA's test_2.csv writes its choices "A:text" and its answer as the letter
        choices = [f"{L}:{t}" for L, t in options.items()]
        letter = next((L for L, t in options.items() if t == answer), answer)
        return mek_choice(choices, letter, row.get("generated", "") or "")
    # OmniMedVQA: choices "A. text", the answer the letter of the last option equal to it
    choices = [f"{L}. {t}" for L, t in options.items()]
    letter = next((L for L, t in reversed(list(options.items())) if t == answer), answer)
    return mek_choice(choices, letter, _tagged(row.get("generated", "") or "", "answer"))


# ---- llava_med

_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = ("a", "an", "the")


def llava_normalize(text: str) -> str:
    """The VQA normalisation LLaVA-Med applies: punctuation removed (joined when it touches a
    space or the text has a digit comma, else replaced by a space), full stops not before a
    digit removed (at most 32, a quirk kept), lower-cased words, number words to digits,
    articles dropped, commas removed. (Its respelling of contractions is left out.)"""
    joined = bool(re.search(r"\d,\d", text))
    out = text
    for p in _PUNCT:
        out = out.replace(p, "" if (p + " " in text or " " + p in text or joined) else " ")
    out = re.sub(r"\.(?!\d)", "", out, count=32)
    words = [_NUMBER_WORDS.get(w, w) for w in out.lower().split()]
    return " ".join(w for w in words if w not in _ARTICLES).replace(",", "")


def llava_recall(answer: str, reply: str) -> float:
    """LLaVA-Med's open-question recall: reply words found in the answer, each counted as often
    as the reply repeats it, over those plus the answer's words missing from the reply."""
    ref = Counter(llava_normalize(llava_normalize(answer.lower())).split())
    hyp = Counter(llava_normalize(llava_normalize(reply.lower())).split())
    if not ref or not hyp:
        return 0.0
    found = sum(n for w, n in hyp.items() if w in ref)
    missed = sum(n for w, n in ref.items() if w not in hyp)
    return found / (found + missed) if found else 0.0


def llava_closed(answer: str, reply: str) -> int:
    text, want = llava_normalize(reply.lower()), llava_normalize(answer.lower())
    return int(("yes" in text or "no" in text) and want in text)


# ---- huatuo

_LETTER = re.compile(r"(?:is |是|为|\W|^)(?![aA] )([a-nA-N])(?:\W|$)", re.S)


def huatuo_letter(reply: str, options: Mapping[str, str]) -> str:
    """HuatuoGPT-Vision's ``match_choice3``: the first letter a-n standing alone (as written:
    a lower-case letter never names an option), else the option whose text occurs last in
    the lower-cased reply, else the option most similar to it (difflib, ties to the later)."""
    found = _LETTER.search(reply)
    if found:
        return found.group(1)
    text = reply.lower()
    at = [(L, text.rindex(t.lower())) for L, t in options.items() if t.lower() in text]
    if at:
        return sorted(at, key=lambda x: x[1], reverse=True)[0][0]
    best, best_ratio = "", 0.0
    for L, t in options.items():
        ratio = difflib.SequenceMatcher(None, t.lower(), text).ratio()
        if ratio >= best_ratio:
            best, best_ratio = L, ratio
    return best


def huatuo_cells(row: Mapping[str, str]) -> Dict[str, Any]:
    options, answer = present_options(row), row.get("output", "")
    if answer == "" or not options:
        return {"huatuo_predict": "", "huatuo_correct": ""}
    letter = huatuo_letter(row.get("generated", "") or "", options)
    want = next((L for L, t in options.items() if t == answer), None)  # their first option equal to it
    return {"huatuo_predict": letter, "huatuo_correct": int(want is not None and letter == want)}


# ---- A row's cells and a file's numbers


def row_cells(row: Mapping[str, str], suite: str) -> Dict[str, Any]:
    """The per-row cells of every peer convention (``BENCHMARK_COLUMNS``) for a row of a
    file of ``suite`` (its name's prefix: slake, pathvqa, vqaradhf, pmcvqa, questions,
    omnimedvqa); empty where a convention does not score the row."""
    out: Dict[str, Any] = {c: "" for c in BENCHMARK_COLUMNS}
    mek = medevalkit_correct(row, suite)
    out["medevalkit_correct"] = "" if mek is None else mek
    kind, answer, reply = row.get("answer_type", ""), row.get("output", ""), row.get("generated", "") or ""
    if suite == "omnimedvqa" or kind == "choice":
        out.update(huatuo_cells(row))
    elif answer != "" and kind == "open":
        out["llava_med_recall"] = round(llava_recall(answer, reply), 6)
    elif answer != "" and kind == "closed":
        out["llava_med_correct"] = llava_closed(answer, reply)
    return out


def _mean(values: Sequence[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def _numbers(rows: Sequence[Mapping[str, Any]], column: str, kinds: Optional[Sequence[str]] = None) -> List[float]:
    return [float(r[column]) for r in rows if str(r.get(column, "")) != "" and (kinds is None or r.get("answer_type") in kinds)]


def headlines(rows: Sequence[Mapping[str, Any]], suite: str, *, judged: bool = False) -> Dict[str, Dict[str, Any]]:
    """Each peer convention's numbers over rows that hold their cells (``row_cells``).

    ``medevalkit``: ``overall`` (its "total metrics" accuracy: right over every scored
    question, micro), per question type, and with ``judged`` (rows holding a
    ``judge_verdict``) ``judged_overall``: the judge's verdict where one was given, the
    rule elsewhere, as its tables with the LLM judge on. ``llava_med``: open recall and
    closed accuracy. ``huatuo``: accuracy over choice questions (micro)."""
    mek = _numbers(rows, "medevalkit_correct")
    out: Dict[str, Dict[str, Any]] = {"medevalkit": {"n": len(mek), "overall": _mean(mek)}}
    for kind in ("closed", "open", "choice"):
        values = _numbers(rows, "medevalkit_correct", [kind])
        if values and suite != "omnimedvqa":
            out["medevalkit"][kind] = _mean(values)
    if judged:
        verdicts = [float(r["judge_verdict"]) if str(r.get("judge_verdict", "")) != "" else float(r["medevalkit_correct"])
                    for r in rows if str(r.get("medevalkit_correct", "")) != ""]
        out["medevalkit"]["judged_overall"] = _mean(verdicts)
        out["medevalkit"]["judged_rows"] = sum(str(r.get("judge_verdict", "")) != "" for r in rows)
    if suite != "omnimedvqa":
        recall, closed = _numbers(rows, "llava_med_recall"), _numbers(rows, "llava_med_correct")
        out["llava_med"] = {"open_recall": _mean(recall), "n_open": len(recall),
                            "closed_accuracy": _mean(closed), "n_closed": len(closed)}
    huatuo = _numbers(rows, "huatuo_correct")
    if huatuo:
        out["huatuo"] = {"accuracy": _mean(huatuo), "n": len(huatuo)}
    return out
