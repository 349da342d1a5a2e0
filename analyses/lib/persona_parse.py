"""Parse one generated customer persona (conf/prompts/personas.yaml) into its attributes.

The form is `Label: value`, one field per line, in any order; the review may run over several
lines, up to the next field label.  Models decorate forms, so a label line may carry list
markers or markdown (`1. **Age:** 34`, `- MBTI type - INTJ`) and labels have aliases (`Surname`,
`Personality type`, ...).  A full `Name:` fills first and last name when those fields are absent.
The first occurrence of a field wins (rambling models repeat forms).

Every field ends in one of three states, so nothing is dropped silently:
  ok       a usable value (normalised: genders folded to female/male where unambiguous,
           ages to an integer in [0, 120], MBTI to one of the 16 four-letter types; names are
           at most 3 words of letters joined by spaces, hyphens, apostrophes or periods;
           other attributes at most 5 words);
  invalid  the label is there but the value is not usable (empty, a template placeholder such
           as `<first name>`, an age without a number, a personality type that is not MBTI);
  missing  the label never appears.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

FIELDS = ("first_name", "last_name", "gender", "age", "nationality", "ethnicity", "mbti", "review")

ALIASES = {
    "first_name": ("first name", "firstname", "given name", "forename"),
    "last_name": ("last name", "lastname", "surname", "family name"),
    "full_name": ("name", "full name", "customer name"),
    "gender": ("gender", "sex"),
    "age": ("age",),
    "nationality": ("nationality", "citizenship", "country"),
    "ethnicity": ("ethnicity", "ethnic background", "ethnic group", "race"),
    "mbti": (
        "mbti type",
        "mbti",
        "mbti personality type",
        "personality type",
        "personality",
        "myers-briggs type",
        "myers briggs type",
        "myers-briggs personality type",
    ),
    "review": ("review", "customer review", "product review", "the review"),
}
LABEL_OF = {alias: name for name, aliases in ALIASES.items() for alias in aliases}

# optional list marker or quote, optional markdown, a label, markdown, then ':' (or ' - ')
LINE = re.compile(
    r"^\s*(?:[-*•>]+\s*|\d{1,2}[.)]\s*)?[*_#\s]*(?P<label>[A-Za-z][A-Za-z '-]{0,40}?)"
    r"\s*[*_]*\s*(?::|\s[-–—]\s)\s*[*_]*\s*(?P<value>.*)$"
)
PLACEHOLDER = re.compile(r"^[<\[{(].*[>\]})]$|^(?:n/?a|none|unknown|\.+|_+|-+|\?+)$", re.I)
MBTI = re.compile(r"\b([EI][NS][TF][JP])(?:-[AT])?\b", re.I)
NAME = re.compile(r"^[^\W\d_][^\W\d_ .'’-]*(?:[ .'’-]+[^\W\d_]+)*\.?$")  # letters, . ' - and spaces
LETTER = re.compile(r"[^\W\d_]")  # any Unicode letter
AGE = re.compile(r"(?<!\d)(\d{1,3})(?!\d)")
GENDER = {
    "f": "female",
    "w": "female",
    "woman": "female",
    "girl": "female",
    "female": "female",
    "m": "male",
    "man": "male",
    "boy": "male",
    "male": "male",
}


@dataclass
class Persona:
    values: dict = field(default_factory=dict)  # field -> normalised value (ok fields only)
    status: dict = field(default_factory=dict)  # field -> "ok" | "invalid" | "missing"

    @property
    def complete(self) -> bool:
        return all(s == "ok" for s in self.status.values())


def label_line(line: str):
    """(field, value text) if the line starts with a known field label, else None."""
    m = LINE.match(line)
    if not m:
        return None
    name = LABEL_OF.get(" ".join(m["label"].lower().split()))
    return (name, m["value"]) if name else None


def clean(value: str) -> str:
    """Strip markdown, quotes and trailing punctuation; collapse whitespace."""
    v = " ".join(value.replace("**", " ").replace("__", " ").split())
    return v.strip(" *_`\"'“”‘’").rstrip(" .,;").strip(" *_`\"'“”‘’")


def short(value: str, max_words: int) -> str | None:
    v = clean(value)
    if not v or PLACEHOLDER.match(v) or not LETTER.search(v) or len(v.split()) > max_words:
        return None
    return v


def normalise(name: str, value: str):
    """The usable value of one field, or None if the value is not usable."""
    if name == "age":
        m = AGE.search(value)
        return int(m[1]) if m and 0 <= int(m[1]) <= 120 else None
    if name == "mbti":
        m = MBTI.search(value)
        return m[1].upper() if m else None
    if name == "gender":
        v = short(value, 3)
        return GENDER.get(v.lower(), v.lower()) if v else None
    if name == "review":  # keeps its line breaks and final punctuation
        v = "\n".join(
            " ".join(line.replace("**", " ").split()) for line in value.strip().split("\n")
        )
        v = v.strip(' *_`"“”\n')
        return v if LETTER.search(v) and not PLACEHOLDER.match(v) else None
    if name in ("first_name", "last_name"):
        v = short(value, 3)
        return v if v and NAME.match(v) else None
    return short(value, 5)


def parse(text: str, lead: str | None = None) -> Persona:
    """Attributes of one completion.  `lead` is the field whose label the prompt ends on
    (the completion then starts inside that field), or None."""
    lines = text.replace("\r\n", "\n").lstrip(" \t\n").split("\n")
    found: dict[str, list[str]] = {}
    current = None
    lead = lead or implied_lead(lines)
    if lead and not label_line(lines[0]):
        current = lead
        found[lead] = [lines[0]]
        lines = lines[1:]
    for line in lines:
        hit = label_line(line)
        if hit:
            current = hit[0] if hit[0] not in found else None  # first occurrence wins
            if current:
                found[current] = [hit[1]]
        elif current == "review":
            found["review"].append(line)  # the review runs on until the next label
        else:
            current = None
    p = Persona()
    full = found.pop("full_name", None)
    if full is not None:
        words = clean(" ".join(full)).split()
        if len(words) >= 2 and not PLACEHOLDER.match(" ".join(words)):
            found.setdefault("first_name", [words[0]])
            found.setdefault("last_name", [" ".join(words[1:])])
    for name in FIELDS:
        if name not in found:
            p.status[name] = "missing"
            continue
        v = normalise(name, "\n".join(found[name]) if name == "review" else found[name][0])
        p.status[name] = "invalid" if v is None else "ok"
        if v is not None:
            p.values[name] = v
    return p


def implied_lead(lines: list[str]) -> str | None:
    """A completion that answers a form ending on a label often starts with the bare value:
    `Emily` then `Last name: Chen`.  An unlabelled first line directly followed by the label
    of field k belongs to field k - 1."""
    rest = [line for line in lines[1:] if line.strip()]
    if label_line(lines[0]) or not lines[0].strip() or not rest:
        return None
    hit = label_line(rest[0])
    k = FIELDS.index(hit[0]) if hit and hit[0] in FIELDS else 0
    return FIELDS[k - 1] if k > 0 else None


SPECIAL = re.compile(r"<\|[^|<>]{1,40}\|>|</?s>|\[/?INST\]")  # chat-template markers
ROLE = re.compile(r"^\s*(?:system|user|assistant|model)\s*:?\s*$", re.I)


def lead_field(prompt_text: str) -> str | None:
    """The field whose label the prompt ends on, if any.  A chat template wraps the form
    (`First name:<|im_end|>\n<|im_start|>assistant\n`): its markers and role lines are not
    part of the form, so the last line of the user's text decides."""
    lines = [SPECIAL.sub("", line) for line in prompt_text.split("\n")]
    lines = [line for line in lines if line.strip() and not ROLE.match(line)]
    if not lines:
        return None
    hit = label_line(lines[-1].rstrip(" \t"))
    return hit[0] if hit and not clean(hit[1]) else None


def sentences(review: str) -> list[str]:
    """Split a review into sentences (., ! or ? followed by space, or line breaks); sentences of
    fewer than two words and template placeholders (`<the customer's review>`) are left out."""
    parts = re.split(r"(?<=[.!?])[\"”’')\]]*\s+|\n+", review)
    out = [s.strip(' -*•"”“') for s in parts]
    return [s for s in out if len(re.findall(r"[^\W\d_]+", s)) >= 2 and not PLACEHOLDER.match(s)]
