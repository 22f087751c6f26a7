"""Generate the bundled DEMO sample: synthetic, movie-review-style text.

    python -m bigmodel_ops.data.sample --out data/sample

writes ``reviews.csv`` (columns ``text,label``; labels ``negative``/``positive``)
and ``unlabeled.txt`` (one review per line). The output is a pure function of
the seed and the counts: only :class:`random.Random` is used (its sequences are
stable across Python versions) and nothing iterates over a set, so the committed
files can be checked byte for byte against a fresh run.

The reviews are made to be non-trivial for a classifier while staying small:

* length from one sentence to several paragraphs joined by ``<br /><br />``,
  with occasional ``<i>`` tags and HTML entities (``&quot;``, ``&amp;``, ``&#39;``);
* mixed sentiment: praise for one aspect and scorn for another, with the label
  decided by the concluding verdict (``Great cast, awful script ... 3/10``);
* negation ("not bad at all", "I did not enjoy"), and mild sarcasm
  ("what a treat: two hours I will never get back");
* a few exact duplicates, near-duplicates that differ only in markup or
  whitespace, rows shorter than ``min_chars``, and labeled reviews repeated in
  the unlabeled file, so that normalisation and dedup have work to do.

This is not real data: use it to exercise the pipeline, not to judge a model.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import random
import sys
from pathlib import Path

DEFAULT_SEED = 1337
DEFAULT_LABELED = 2200
DEFAULT_UNLABELED = 2200
LABELS = ("negative", "positive")

# fmt: off
TITLE_ADJ = [
    "Silent", "Crimson", "Last", "Broken", "Midnight", "Golden", "Hollow", "Distant", "Frozen",
    "Burning", "Lost", "Secret", "Savage", "Quiet", "Electric", "Iron", "Paper", "Wild", "Endless",
    "Bitter", "Velvet", "Northern", "Hidden", "Scarlet", "Final", "Forgotten", "Glass", "Restless",
]
TITLE_NOUN = [
    "Harbor", "Empire", "Garden", "Protocol", "Summer", "Witness", "Frontier", "Orchard", "Signal",
    "Kingdom", "Station", "Reckoning", "Promise", "Tide", "Highway", "Lantern", "Canyon", "Verdict",
    "Carnival", "Horizon", "Monsoon", "Bridge", "Covenant", "Motel", "Lighthouse", "Echo", "Heist",
]
GENRES = [
    "thriller", "romantic comedy", "horror film", "western", "space opera", "courtroom drama",
    "war movie", "musical", "heist caper", "coming-of-age story", "documentary", "animated feature",
    "film noir", "slasher", "biopic", "family comedy", "disaster movie", "psychological drama",
    "sci-fi epic", "martial arts film", "period piece", "road movie", "sports drama", "mockumentary",
]
FIRST = [
    "Anna", "Marcus", "Elena", "Tom", "Priya", "Jack", "Sofia", "Daniel", "Mei", "Oscar", "Grace",
    "Luca", "Nadia", "Samuel", "Ingrid", "Victor", "Amara", "Henry", "Chloe", "Rafael", "Yuki",
    "Bruno", "Leila", "Walter", "Zoe", "Kofi", "Helena", "Ivan", "Maya", "Dennis",
]
LAST = [
    "Hartley", "Okafor", "Lindqvist", "Moreno", "Kowalski", "Nakamura", "Brennan", "Dubois", "Ferreira",
    "Walsh", "Achebe", "Rossi", "Castellano", "Petrov", "Whitaker", "Osei", "Holm", "Delacroix",
    "Mendes", "Thornton", "Sato", "Kaplan", "Abernathy", "Vance", "Quinlan", "Reyes", "Stroud",
]
ROLES = [
    "detective", "widowed farmer", "rookie cop", "retired boxer", "small-town teacher", "ambitious lawyer",
    "washed-up rock star", "grieving mother", "con artist", "ship captain", "reluctant spy", "night nurse",
    "disgraced surgeon", "teenage runaway", "aging gunslinger", "lighthouse keeper", "chess prodigy",
    "union organizer", "failed novelist", "astronaut",
]
EVENTS = [
    "discovers a secret that could ruin the whole town",
    "must protect a key witness from a ruthless gang",
    "returns home after twenty years to settle an old debt",
    "is drawn into a conspiracy that reaches the top",
    "tries to win back an estranged family",
    "plans one last job before retiring",
    "gets stranded far from help when a storm hits",
    "falls for the one person who could expose everything",
    "has to survive a single night in a haunted house",
    "trains a ragtag team for an impossible championship",
    "investigates a string of disappearances by the lake",
    "wakes up with no memory of the previous week",
]
RELATIONS = ["wife", "husband", "kids", "brother", "sister", "best friend", "parents", "film club", "roommate"]
PLACES = ["a festival screening", "a half-empty multiplex", "home on a rainy Sunday", "a late-night TV slot",
          "an old art-house cinema", "a long flight"]

POS_ASPECT = [
    "{actor} is superb as the {role}, all quiet intensity and perfect timing.",
    "The cinematography is gorgeous; nearly every frame looks like a painting.",
    "The score by {name} is haunting and used with real restraint.",
    "The script is sharp, and several lines are genuinely funny.",
    "{director} directs with real confidence and never wastes a scene.",
    "The supporting cast, especially {actor2}, is excellent.",
    "The pacing is tight and the final act is gripping.",
    "The dialogue feels natural, which is rarer than it should be.",
    "The special effects are seamless and always serve the story.",
    "The chemistry between {actor} and {actor2} is wonderful to watch.",
    "The production design is stunning, down to the smallest prop.",
    "The ending is moving and completely earned.",
    "The characters feel like real people with real problems.",
    "It is a clever, heartfelt and beautifully made {genre}.",
]
NEG_ASPECT = [
    "The plot makes no sense whatsoever, and the twist is visible from a mile away.",
    "{actor} looks bored in every scene, as if reading the lines for the first time.",
    "The dialogue is clunky and painfully on the nose.",
    "The pacing is glacial; the middle hour drags terribly.",
    "The editing is a mess and the action scenes are impossible to follow.",
    "The score is loud, generic and never stops telling you what to feel.",
    "The special effects look cheap, even for a film of this budget.",
    "The ending is rushed and undoes everything that came before.",
    "{director} seems to have no idea what story to tell.",
    "The characters are paper-thin and impossible to care about.",
    "The script is lazy, stitched together from better films.",
    "The humor falls flat, and the romance is worse.",
    "It is a dull, confused and badly made {genre}.",
    "The supporting cast, {actor2} included, is wasted on a terrible script.",
]
# Negated forms: polarity comes from the whole phrase, not from the sentiment words in it.
NEG_NEGATED = [
    "I did not enjoy a single minute of it.",
    "The jokes are not funny, not even once.",
    "It is not a good film, and not even a fun bad one.",
    "I would not call the acting convincing.",
    "Nothing about the story is believable, and it is never exciting.",
    "I did not care what happened to any of them.",
]
POS_NEGATED = [
    "Not bad at all.",
    "I was not bored for a second.",
    "The twist is not predictable in the least.",
    "It never feels long despite the running time.",
    "I can't think of a single wasted scene.",
    "You won't regret watching it.",
    "I did not expect to be moved, but I was.",
]
SARCASM = [
    "Oh great, another {genre} where the {role} has one last job.",
    "What a treat: two hours I will never get back.",
    "Brilliant, if your idea of fun is watching paint dry.",
    "Sure, because every {genre} needs a twenty-minute car chase.",
    "I especially loved the part where I checked my watch for the fifth time.",
    "A masterpiece of boredom; I have seen more tension in a grocery queue.",
]
OPENERS = [
    "I watched {title} last night with my {relation}.",
    "{title} ({year}) is a {genre} directed by {director}.",
    "I went in with low expectations.",
    "I had heard great things about {title}.",
    "As a fan of {director}&#39;s earlier work, I was curious about this one.",
    "Saw {title} at {place}.",
    "Where do I even start with {title}?",
    "This is the kind of {genre} they rarely make anymore.",
    "My {relation} dragged me to see {title}.",
    "I finally caught up with {title}, years after everyone else.",
]
PLOTS = [
    "{actor} plays {a_role} who {event}.",
    "The story follows {a_role} ({actor}) who {event}.",
    "In short: {a_role} {event}, and things go wrong from there.",
    "{actor} stars as {a_role} who {event}, while {actor2} plays the sibling who knows more than they say.",
]
POS_CONCLUSIONS = [
    "Overall, a wonderful film and I would happily watch it again. {score}/10.",
    "Highly recommended.",
    "Despite its flaws, I loved it.",
    "In the end, the good far outweighs the bad: {score} out of 10.",
    "One of the best {genre}s I have seen in years.",
    "Go see it, you will not be disappointed. {score}/10.",
    "A small gem that deserves a much bigger audience.",
    "Flawed, yes, but I left the cinema smiling. {score}/10.",
]
NEG_CONCLUSIONS = [
    "Overall, a waste of time. {score}/10.",
    "Avoid.",
    "Despite the strong cast, I cannot recommend it.",
    "In the end, it is a mess: {score} out of 10.",
    "One of the worst {genre}s I have seen in years.",
    "Skip it and watch something else. {score}/10.",
    "A few nice moments cannot save it.",
    "I wanted to like it, I really did, but no. {score}/10.",
]
# Mixed reviews: one aspect praised, another hated; the verdict (label) follows the last clause.
MIXED_NEG = [
    "The acting is wonderful, but the plot is a disaster.",
    "{actor} gives it everything, but great acting cannot save a terrible script.",
    "It looks beautiful, I will give it that; it is also unbearably boring.",
    "The first half is promising; the second half throws it all away.",
]
MIXED_POS = [
    "The plot is thin, but the performances more than make up for it.",
    "The script has problems, yet {actor} is so good that I stopped caring.",
    "It starts slowly and the effects are dated, but the ending blew me away.",
    "Some of the dialogue is clumsy, but the heart of the film is in the right place.",
]
SHORT_POS = [
    "Loved it, {title} is a gem. {score}/10.", "Great fun from start to finish; {actor} steals the show.",
    "{title} is a beautiful, moving {genre}.", "Not bad at all, {title} surprised me. {score}/10.",
]
SHORT_NEG = [
    "{title}: terrible. Avoid.", "Boring and far too long; even {actor} cannot save it.",
    "What a mess of a {genre}; I walked out of {title}.", "I did not enjoy {title} at all. {score}/10.",
]
TOO_SHORT = ["Meh.", "Ok.", "Wow!", "10/10", "Ugh."]
# fmt: on


class ReviewWriter:
    """Compose one review of a given polarity from the word lists."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def _name(self) -> str:
        return f"{self.rng.choice(FIRST)} {self.rng.choice(LAST)}"

    def _title(self) -> str:
        rng = self.rng
        form = rng.randrange(6)
        adj, noun = rng.choice(TITLE_ADJ), rng.choice(TITLE_NOUN)
        if form == 0:
            title = f"The {adj} {noun}"
        elif form == 1:
            title = f"{noun} of the {rng.choice(TITLE_NOUN)}"
        elif form == 2:
            title = f"{adj} {noun} {rng.choice(['II', 'III', 'Returns', 'Rising'])}"
        elif form == 3:
            title = f"{rng.choice(FIRST)}&#39;s {noun}"
        elif form == 4:
            title = f"{noun} &amp; {rng.choice(TITLE_NOUN)}"
        else:
            title = f"{adj} {noun}"
        style = rng.randrange(4)
        if style == 0:
            return f"&quot;{title}&quot;"
        if style == 1:
            return f"<i>{title}</i>"
        return title

    def _fill(self, template: str, slots: dict[str, str]) -> str:
        return template.format(**slots)

    def review(self, positive: bool) -> str:
        rng = self.rng
        slots = {
            "title": self._title(),
            "actor": self._name(),
            "actor2": self._name(),
            "director": self._name(),
            "name": self._name(),
            "role": (role := rng.choice(ROLES)),
            "a_role": ("an " if role[0] in "aeiou" else "a ") + role,
            "event": rng.choice(EVENTS),
            "genre": rng.choice(GENRES),
            "relation": rng.choice(RELATIONS),
            "place": rng.choice(PLACES),
            "year": str(rng.randint(1958, 2024)),
            "score": str(rng.randint(7, 10) if positive else rng.randint(1, 4)),
        }
        shape = rng.random()
        if shape < 0.08:  # one sentence
            return self._fill(rng.choice(SHORT_POS if positive else SHORT_NEG), slots)
        same_aspect, other_aspect = (POS_ASPECT, NEG_ASPECT) if positive else (NEG_ASPECT, POS_ASPECT)
        negated = POS_NEGATED if positive else NEG_NEGATED
        conclusions = POS_CONCLUSIONS if positive else NEG_CONCLUSIONS
        paragraphs: list[list[str]] = []
        intro = [rng.choice(OPENERS)]
        if rng.random() < 0.7:
            intro.append(rng.choice(PLOTS))
        paragraphs.append(intro)
        n_body = 1 if shape < 0.35 else rng.choice([2, 2, 3, 4])
        mixed = rng.random() < 0.35
        # Drawn without replacement so a review does not repeat itself.
        pool = rng.sample(same_aspect, k=len(same_aspect))
        for _ in range(n_body):
            body = [pool.pop() for _ in range(min(len(pool), rng.randint(1, 3)))]
            if mixed or rng.random() < 0.25:
                body.insert(rng.randrange(len(body) + 1), rng.choice(other_aspect))
            if rng.random() < 0.35:
                body.append(rng.choice(negated))
            if not positive and rng.random() < 0.25:
                body.append(rng.choice(SARCASM))
            paragraphs.append(body)
        ending = []
        if mixed:
            ending.append(rng.choice(MIXED_POS if positive else MIXED_NEG))
        ending.append(rng.choice(conclusions))
        paragraphs.append(ending)
        if n_body == 1 and rng.random() < 0.5:  # short reviews are often one paragraph
            paragraphs = [[s for p in paragraphs for s in p]]
        text = "<br /><br />".join(" ".join(self._fill(s, slots) for s in p) for p in paragraphs)
        return text


def generate(
    *, seed: int = DEFAULT_SEED, labeled: int = DEFAULT_LABELED, unlabeled: int = DEFAULT_UNLABELED
) -> tuple[list[tuple[str, str]], list[str]]:
    """Return (labeled rows as (text, label), unlabeled lines), deterministically from `seed`."""
    rng = random.Random(seed)
    writer = ReviewWriter(rng)
    base = labeled - labeled // 40 - len(TOO_SHORT)  # room for duplicates and too-short rows
    polarities = [i % 2 == 1 for i in range(base)]
    rng.shuffle(polarities)
    rows = [(writer.review(p), LABELS[int(p)]) for p in polarities]
    # Exact duplicates, and copies that only normalisation reveals as duplicates.
    for i in range(labeled // 40):
        text, label = rows[rng.randrange(base)]
        if i % 3 == 2:
            text = "  " + text.replace("<br /><br />", "<br/><br/>  ", 1) + " "
        rows.append((text, label))
    for short in TOO_SHORT:
        rows.append((short, LABELS[rng.randrange(2)]))
    rng.shuffle(rows)

    lines = [writer.review(rng.random() < 0.5) for _ in range(unlabeled - unlabeled // 100)]
    # A few labeled reviews reappear unlabeled: dedup keeps the labeled copy only.
    lines += [rows[rng.randrange(len(rows))][0] for _ in range(unlabeled // 100)]
    rng.shuffle(lines)
    return rows, lines


def render(rows: list[tuple[str, str]], lines: list[str]) -> dict[str, bytes]:
    """The file contents, byte for byte (LF line ends, minimal CSV quoting)."""
    buffer = io.StringIO()
    out = csv.writer(buffer, lineterminator="\n")
    out.writerow(["text", "label"])
    out.writerows(rows)
    return {
        "reviews.csv": buffer.getvalue().encode("utf-8"),
        "unlabeled.txt": "".join(line + "\n" for line in lines).encode("utf-8"),
    }


def write_sample(out: Path, *, seed: int = DEFAULT_SEED) -> dict[str, str]:
    """Write the sample files into `out`; return {file name: sha256}."""
    out.mkdir(parents=True, exist_ok=True)
    files = render(*generate(seed=seed))
    for name, data in files.items():
        (out / name).write_bytes(data)
    return {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate the synthetic DEMO movie-review sample.")
    parser.add_argument("--out", type=Path, default=Path("data/sample"), help="output folder")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args(argv)
    for name, digest in write_sample(args.out, seed=args.seed).items():
        print(f"{args.out / name}  sha256={digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
