"""The offline `generated` source: a template corpus of review-like prompts and completions.

Sentiment is set by word lists per level and grammar errors are injected at marked sites, so the
labels an engine gives can be checked against what was put in (`meta`: levels, injected errors).
"""

from __future__ import annotations

import random
import re
from typing import Any

from emdpo_plugin.errors import EmdpoError

from .item import Item

_TITLE_ADJ = ["Silent", "Crimson", "Last", "Hidden", "Broken", "Golden", "Distant", "Burning", "Frozen", "Lonely",
              "Midnight", "Forgotten", "Electric", "Wild", "Quiet", "Restless", "Hollow", "Bright", "Endless",
              "Secret", "Velvet", "Iron", "Paper", "Northern"]
_TITLE_NOUN = ["Harbor", "Garden", "Empire", "River", "Station", "Horizon", "Mirror", "Summer", "Kingdom",
               "Frontier", "Letter", "Island", "Highway", "Orchard", "Carnival", "Lighthouse", "Circus", "Valley",
               "Tower", "Promise", "Voyage", "Winter", "Signal", "Canyon"]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_COMPANIONS = ["my sister", "my brother", "my parents", "a friend from work", "my roommate", "my wife",
               "my husband", "my kids", "my grandmother", "two old friends", "my film club", "my neighbor"]
_GENRES = ["drama", "thriller", "comedy", "western", "war film", "romance", "horror film", "musical",
           "crime story", "science fiction film", "family film", "mystery"]
_PLACES = ["at a small theater downtown", "on cable late at night", "on a long flight", "at a festival screening",
           "on an old DVD", "at the local cinema", "on a rainy afternoon at home", "at a friend's house"]
_DIRECTORS = ["Martin Hale", "Ruth Calder", "Tom Okafor", "Elena Brandt", "Jack Moreno", "Nina Sorensen",
              "Paul Whitaker", "Grace Lindqvist", "Omar Castell", "Helen Park"]
_LEADS = ["Anna Reyes", "David Cole", "Laura Finch", "Sam Becker", "Julia Romano", "Peter Vance", "Clara Moss",
          "Victor Lang", "Emma Stiles", "Henry Kato"]
_PROMPTS = [
    "I watched {title} {place} with {companion}, and I went in expecting a fairly ordinary {genre} from {year}.",
    "{title} is a {year} {genre} directed by {director}, and I finally saw it {place} last {day} with {companion}.",
    "I rented {title} on {day} because {companion} kept talking about it, so I sat down to watch this {genre}.",
    "When {title} came out in {year}, nobody I knew had seen it, but last {day} I watched it {place}.",
    "This {genre} stars {lead} and was made in {year} by {director}, who also wrote the script for {title}.",
    "My review of {title}, a {genre} by {director}: I saw it {place} with {companion} a few weeks ago.",
    "After years of hearing about {title}, I sat down {place} last {day} to see if this {year} {genre} holds up.",
    "{lead} plays the lead in {title}, a {genre} from {year} that {companion} and I watched {place}.",
    "I had never heard of {title} before {companion} brought it home on {day}, and it turned out to be a {genre}.",
    "Let me say first that I am a big fan of {director}, so I watched {title} {place} with {companion}.",
    "{title} ({year}) is the kind of {genre} that shows up {place}, and I gave it a chance with {companion}.",
    "I caught {title} {place} on {day}; it is a {genre} with {lead} in the main role, directed by {director}.",
    "Somebody at work lent me {title}, a {year} {genre}, and I watched it last {day} with {companion}.",
    "Before I start, a warning: this review of {title} discusses the whole plot of this {genre} by {director}.",
]
_ADJ = {
    2: ["brilliant", "wonderful", "superb", "outstanding", "fantastic", "excellent", "amazing", "magnificent",
        "beautiful", "terrific", "marvelous", "delightful"],
    1: ["good", "nice", "enjoyable", "pleasant", "solid", "decent", "charming", "fun", "likable", "entertaining",
        "engaging", "sweet"],
    0: ["long", "ordinary", "typical", "familiar", "simple", "muted", "unusual", "old-fashioned", "slow", "modest",
        "straightforward", "talky"],
    -1: ["dull", "weak", "boring", "bland", "tedious", "messy", "forgettable", "silly", "clumsy", "flat", "uneven",
         "lazy"],
    -2: ["awful", "terrible", "horrible", "dreadful", "atrocious", "painful", "pathetic", "disastrous", "abysmal",
         "ugly", "miserable", "hideous"],
}
_ADV = ["really", "very", "truly", "quite", "pretty", "rather", "fairly", "so"]
_ASPECTS = ["acting", "script", "plot", "soundtrack", "dialogue", "pacing", "cinematography", "ending", "direction",
            "editing", "humor", "score", "lighting", "final act", "opening scene", "story"]
_STARS = {2: ["nine", "ten"], 1: ["seven", "eight"], 0: ["five", "six"], -1: ["three", "four"], -2: ["one", "two"]}
# Sentence templates. `[right|wrong]` is an error site (the wrong form is one Harper flags:
# subject-verb agreement, wrong participle/tense, "could of", "alot", "suppose to", "more
# better", their/they're, its/it's); `{a_adj}` is an article + adjective whose article can be
# made wrong ("a awful"). Doubled words ("the the", "was was") are a further site in any
# sentence. Missing articles are not injected: Harper does not flag them.
_SENTENCES = [
    "The {aspect} was {adv} {adj}, and [we were|we was] all aware of it.",
    "[I have seen|I have saw] many films like this one, and this one was {adj}.",
    "Honestly, the {aspect} felt {adj} from the first scene to the last.",
    "[It is|It are] {a_adj} film from start to finish.",
    "The director [could have|could of] cut twenty minutes, but the {aspect} was {adj}.",
    "[I would have|I would of] given it {stars} out of ten, because the {aspect} is {adj}.",
    "The ending was [a lot|alot] more {adj} than I expected.",
    "[He has|He have] {a_adj} screen presence in every scene.",
    "[She does|She do] {a_adj} job as the lead, and the {aspect} is {adj}.",
    "The script was [supposed to|suppose to] be clever, and it was {adj}.",
    "[They're|Their] going to call it {adj} for years.",
    "[It's|Its] {a_adj} story, and the {aspect} is {adv} {adj}.",
    "[We were|We was] both surprised by how {adj} the {aspect} was.",
    "The second half [was better|was more better] than the first, but it stayed {adj}.",
    "[He doesn't|He don't] need much dialogue, and his scenes are {adj}.",
    "My friends [have seen|have saw] it twice and call it {adj}.",
    "[They were|They was] {adv} {adj} together in the quiet scenes.",
    "All in all, it is {a_adj} film with {a_adj} cast.",
]
_SLOT = re.compile(r"\{(adj|adv|aspect|stars|a_adj)\}")
_PART = re.compile(r"\[([^|\]]*)\|([^\]]*)\]|<<([^>]+)>>")
_DOUBLABLE = re.compile(r"\b(the|The|and|was|very|really|is|a)\b")
MAX_SENTENCES = len(_SENTENCES)  # a completion's sentences are distinct templates


def _parse_sentence(template: str, fill: Any) -> list[tuple]:
    """Segments: ("lit", text) | ("swap", right, wrong) | ("art", adjective)."""
    text = _SLOT.sub(lambda m: f"<<{fill('adj')}>>" if m.group(1) == "a_adj" else fill(m.group(1)), template)
    parts: list[tuple] = []
    pos = 0
    for m in _PART.finditer(text):
        if m.start() > pos:
            parts.append(("lit", text[pos : m.start()]))
        parts.append(("swap", m.group(1), m.group(2)) if m.group(3) is None else ("art", m.group(3)))
        pos = m.end()
    if pos < len(text):
        parts.append(("lit", text[pos:]))
    return parts


def _render(parts: list[tuple], wrong: set[tuple[int, int | None]]) -> str:
    out = []
    for i, part in enumerate(parts):
        if part[0] == "swap":
            out.append(part[2] if (i, None) in wrong else part[1])
        elif part[0] == "art":
            word = part[1]
            vowel = word[0].lower() in "aeiou"
            right = "an" if vowel else "a"
            out.append(f"{('a' if vowel else 'an') if (i, None) in wrong else right} {word}")
        else:
            text = part[1]
            starts = sorted((s for (j, s) in wrong if j == i and s is not None), reverse=True)
            for s in starts:  # double the word starting at s
                m = _DOUBLABLE.match(text, s)
                text = text[: m.end()] + " " + m.group(0).lower() + text[m.end():]
            out.append(text)
    return "".join(out)


class ReviewCorpus:
    """Offline review-like prompts and completions with controlled sentiment and grammar errors.

    Each completion gets a sentiment level in `levels` (-2 very negative .. +2 very positive;
    80% of its adjectives come from that level, the rest from a neighbouring one) and a number
    of injected errors k ~ `error_probs`, placed at k distinct error sites of its sentences
    (a count drawn from `sentences`). Level and k are drawn independently, so sentiment and grammar preferences
    disagree on about half of the pairs. Deterministic in the seed.
    """

    def __init__(self, seed: int, *, error_probs: list[float], levels: list[int], sentences: list[int] = (2, 3)) -> None:
        self.rng = random.Random(seed)
        self.sentences = tuple(sentences)
        total = sum(error_probs)
        self.error_probs = [p / total for p in error_probs]
        self.levels = list(levels)
        self._seen_prompts: set[str] = set()

    def prompt(self) -> str:
        r = self.rng
        for _ in range(1000):
            text = r.choice(_PROMPTS).format(
                title=f"The {r.choice(_TITLE_ADJ)} {r.choice(_TITLE_NOUN)}", place=r.choice(_PLACES),
                companion=r.choice(_COMPANIONS), genre=r.choice(_GENRES), year=r.randint(1958, 2008),
                day=r.choice(_DAYS), director=r.choice(_DIRECTORS), lead=r.choice(_LEADS))
            if text not in self._seen_prompts:
                self._seen_prompts.add(text)
                return text
        raise EmdpoError("the generated corpus ran out of distinct prompts; lower source.pool_size")

    def completion(self) -> tuple[str, int, int]:
        """(text, sentiment level, injected errors)."""
        r = self.rng
        level = r.choice(self.levels)
        n_errors = r.choices(range(len(self.error_probs)), weights=self.error_probs)[0]

        def fill(slot: str) -> str:
            if slot == "adj":
                lv = level if r.random() < 0.8 else max(-2, min(2, level + r.choice((-1, 1))))
                return r.choice(_ADJ[lv])
            if slot == "adv":
                return r.choice(_ADV)
            if slot == "aspect":
                return r.choice(_ASPECTS)
            return r.choice(_STARS[level])

        sentences = [_parse_sentence(t, fill) for t in r.sample(_SENTENCES, r.choice(self.sentences))]
        sites: list[tuple[int, int, int | None]] = []
        for si, parts in enumerate(sentences):
            for pi, part in enumerate(parts):
                if part[0] in ("swap", "art"):
                    sites.append((si, pi, None))
                else:
                    sites.extend((si, pi, m.start()) for m in _DOUBLABLE.finditer(part[1]))
        chosen: list[tuple[int, int, int | None]] = []
        for site in r.sample(sites, len(sites)):
            if len(chosen) == n_errors:
                break
            if all(c[:2] != site[:2] for c in chosen):  # at most one error per segment
                chosen.append(site)
        text = " ".join(
            _render(parts, {(pi, s) for (si, pi, s) in chosen if si == i}) for i, parts in enumerate(sentences)
        )
        return " " + text, level, len(chosen)

    def item(self, n: int) -> Item:
        prompt = self.prompt()
        comps: list[str] = []
        levels, errors = [], []
        while len(comps) < n:
            text, level, k = self.completion()
            if text not in comps:
                comps.append(text)
                levels.append(level)
                errors.append(k)
        return Item(prompt, comps, {"levels": levels, "injected_errors": errors})
