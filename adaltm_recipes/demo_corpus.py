"""An offline stand-in for MSP-Podcast: espeak-ng speech whose prosody plays the emotion, in the release layout.

Each of the 8 classes is a prosody profile (pitch level, pitch range, rate, loudness), jittered per utterance;
speakers are espeak voice variants, split speaker-disjointly into Train / Development / Test1; the class mix is
MSP-like (neutral and happiness common; fear, contempt, disgust rare) plus X (no agreement) and O (other) rows;
five simulated annotators vote, mostly for the intended class. Sentences follow a template
("verb the colour object number") and are the transcripts. The out-of-domain ASR corpus (the LibriSpeech role)
has neutral prosody only, other voices and other sentences.

Two conditions (`condition`): `prosody` (the default: the emotion is in the prosody only, the sentences are
neutral) and `lexical`, where the words carry part of the emotion too — the test of the paper's claim that an ASR
vector helps because words carry emotion. Decided before any run (issue 29), for the utterances with a class
label: with probability LEXICAL_SHARE the colour word of the template is replaced by a word of the class's
lexicon ("take the furious box three"), and with probability AMBIGUOUS_SHARE the utterance is spoken with the
prosody of another class drawn uniformly, so that neither cue alone is perfect. These draws come from a generator
of their own: labels, speakers, splits and votes are the prosody condition's, utterance for utterance.

espeak-ng is not bit-deterministic every time (seen once: the first rendering on a fresh machine differed from
every later one in 28,239 of 32,124 samples), so each utterance is rendered until two renderings agree byte for
byte: the same seed gives the same corpus on every run.
"""

from __future__ import annotations

import csv
import dataclasses
import random
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from adaltm_core.errors import UserError


@dataclass(frozen=True)
class Profile:
    pitch: tuple[int, int]        # espeak -p, 0..99
    speed: tuple[int, int]        # espeak -s, words per minute
    amplitude: tuple[int, int]    # espeak -a
    pitch_range: str              # SSML prosody range


PROFILES = {
    "A": Profile((40, 55), (195, 225), (160, 190), "high"),      # anger: loud, fast
    "C": Profile((25, 35), (125, 145), (85, 100), "x-low"),      # contempt: low, flat, slowish
    "D": Profile((30, 40), (110, 130), (110, 130), "low"),       # disgust: low, slow
    "F": Profile((80, 95), (215, 245), (65, 85), "high"),        # fear: high, fast, quiet
    "H": Profile((70, 85), (185, 215), (120, 140), "x-high"),    # happiness: high, lively
    "N": Profile((45, 55), (150, 170), (90, 110), "medium"),     # neutral
    "S": Profile((15, 30), (95, 120), (50, 70), "x-low"),        # sadness: low, slow, quiet
    "U": Profile((85, 99), (165, 185), (130, 150), "x-high"),    # surprise: very high, wide range
}
# MSP-Podcast-like class mix (before X/O rows).
PROPORTIONS = {"N": 0.30, "H": 0.24, "A": 0.10, "S": 0.10, "U": 0.08, "C": 0.07, "D": 0.06, "F": 0.05}
LONG_NAMES = {"A": "Angry", "C": "Contempt", "D": "Disgust", "F": "Fear", "H": "Happy", "N": "Neutral",
              "S": "Sad", "U": "Surprise", "O": "Other"}

IN_DOMAIN_VOICES = {"Train": ["en-us+m1", "en-us+m3", "en-us+f1", "en-us+f3", "en-us+m5", "en-us+f4"],
                    "Development": ["en-us+m7", "en-us+f2"], "Test1": ["en-us+m2", "en-us+f5"]}
OUT_OF_DOMAIN_VOICES = {"Train": ["en-gb+m4", "en-gb+f4", "en-gb+m6", "en-gb+f1"], "Development": ["en-gb+m2"],
                        "Test1": ["en-gb+f3"]}
IN_DOMAIN_WORDS = (["take", "bring", "find", "move", "drop", "hold"], ["red", "blue", "green", "white", "black"],
                   ["box", "cup", "ball", "book", "chair", "shoe"], ["one", "two", "three", "four", "five", "six"])
# The lexical condition's emotion words, one list per class (neutral: plain descriptive words).
LEXICON = {
    "A": ["angry", "furious", "hateful", "violent"], "C": ["pathetic", "worthless", "useless", "stupid"],
    "D": ["disgusting", "filthy", "nasty", "rotten"], "F": ["scary", "dangerous", "terrible", "frightening"],
    "H": ["wonderful", "lovely", "happy", "brilliant"], "N": ["plain", "usual", "normal", "simple"],
    "S": ["sad", "broken", "lonely", "hopeless"], "U": ["amazing", "unexpected", "strange", "sudden"],
}
LEXICAL_SHARE = 0.5       # of labelled utterances: an emotion word of the class replaces the colour word
AMBIGUOUS_SHARE = 0.3     # of labelled utterances: the prosody of another class, drawn uniformly
CONDITIONS = ("prosody", "lexical")
OUT_OF_DOMAIN_WORDS = (["the farmer", "a sailor", "my neighbour", "the teacher"], ["walked", "looked", "waited"],
                       ["near the", "behind the", "under the"], ["river", "garden", "station", "market"])


def _sentence(words: tuple[list[str], ...], rng: random.Random, in_domain: bool) -> str:
    parts = [rng.choice(w) for w in words]
    return f"{parts[0]} the {parts[1]} {parts[2]} {parts[3]}" if in_domain else " ".join(parts)


def render(text: str, voice: str, pitch: int, speed: int, amplitude: int, pitch_range: str, out: Path) -> None:
    """One rendering of an utterance: espeak-ng's speech, resampled to 16 kHz mono 16-bit and trimmed by sox."""
    ssml = f"<speak><prosody range='{pitch_range}'>{text}</prosody></speak>"
    speech = subprocess.run(["espeak-ng", "-v", voice, "-p", str(pitch), "-s", str(speed), "-a", str(amplitude),
                             "-m", "--stdout", ssml], capture_output=True, check=True).stdout
    subprocess.run(["sox", "-D", "-t", "wav", "-", "-r", "16000", "-c", "1", "-b", "16", str(out),
                    "silence", "1", "0.02", "0.5%", "reverse", "silence", "1", "0.02", "0.5%", "reverse"],
                   input=speech, capture_output=True, check=True)


RENDER_ATTEMPTS = 5


def _synthesise(job: tuple, out: Path) -> None:
    """Render `job` until one rendering has come out twice, and keep that one (atomically, at `out`)."""
    seen: list[bytes] = []
    with tempfile.TemporaryDirectory(prefix=".render-", dir=out.parent) as scratch:
        for attempt in range(RENDER_ATTEMPTS):
            candidate = Path(scratch) / f"{attempt}.wav"
            render(*job, candidate)
            data = candidate.read_bytes()
            if data in seen:
                candidate.replace(out)
                return
            seen.append(data)
    raise UserError(f"{out}: espeak-ng and sox gave {RENDER_ATTEMPTS} different renderings of the same utterance; "
                    "the corpus would not be reproducible (check the espeak-ng installation)")


def _votes(code: str, rng: random.Random, annotators: int = 5) -> list[str]:
    classes = list(PROFILES)
    if code == "X":                                   # no agreement: spread votes
        return rng.sample(classes, annotators)
    if code == "O":
        return ["O"] * 3 + [rng.choice(classes) for _ in range(annotators - 3)]
    return [code if rng.random() < 0.75 else rng.choice(classes + ["O"]) for _ in range(annotators)]


@dataclass(frozen=True)
class Utterance:
    """One row of the corpus as planned: what is said, by which voice, with which prosody, and the votes."""
    name: str
    split: str
    code: str                   # the consensus label (X: no agreement, O: other)
    text: str
    voice: str
    prosody: tuple[int, int, int, str]   # espeak pitch, speed, amplitude; SSML pitch range
    votes: tuple[str, ...]
    prosody_of: str                      # the class whose profile `prosody` was drawn from
    emotion_word: str | None = None      # the lexical condition's word, where the sentence carries one


def plan_corpus(sizes: dict[str, int], seed: int = 0, out_of_domain: bool = False,
                condition: str = "prosody") -> list[Utterance]:
    """Every utterance of the corpus, drawn from `seed` (no audio yet): labels and speaker splits can be checked
    without rendering."""
    if condition not in CONDITIONS:
        raise UserError(f"--corpus: one of {', '.join(CONDITIONS)}, got {condition!r}")
    rng = random.Random(seed)
    voices = OUT_OF_DOMAIN_VOICES if out_of_domain else IN_DOMAIN_VOICES
    words = OUT_OF_DOMAIN_WORDS if out_of_domain else IN_DOMAIN_WORDS
    codes, weights = list(PROPORTIONS), list(PROPORTIONS.values())
    plan = []
    for split, count in sizes.items():
        for i in range(count):
            if out_of_domain:
                code = "N"
            else:
                roll = rng.random()
                code = "X" if roll < 0.04 else "O" if roll < 0.07 else rng.choices(codes, weights)[0]
            voice = rng.choice(voices[split])
            acted = code if code in PROFILES else rng.choice(codes)
            profile = PROFILES[acted]
            name = f"{'LIBRI' if out_of_domain else 'MSP-PODCAST'}_{split[:4].upper()}_{i:05d}.wav"
            text = _sentence(words, rng, not out_of_domain)
            prosody = (rng.randint(*profile.pitch), rng.randint(*profile.speed), rng.randint(*profile.amplitude),
                       profile.pitch_range)
            plan.append(Utterance(name, split, code, text, voice, prosody, tuple(_votes(code, rng)), acted))
    if condition == "lexical" and not out_of_domain:
        cues = random.Random(f"lexical-{seed}")
        plan = [_with_lexical_cues(u, cues) if u.code in PROFILES else u for u in plan]
    return plan


def _with_lexical_cues(u: Utterance, rng: random.Random) -> Utterance:
    """The lexical condition for one labelled utterance (every draw made, so each utterance uses the same count)."""
    lexical, word = rng.random() < LEXICAL_SHARE, rng.choice(LEXICON[u.code])
    ambiguous, other = rng.random() < AMBIGUOUS_SHARE, rng.choice([c for c in PROFILES if c != u.code])
    profile = PROFILES[other]
    prosody = (rng.randint(*profile.pitch), rng.randint(*profile.speed), rng.randint(*profile.amplitude),
               profile.pitch_range)
    words = u.text.split()
    words[2] = word if lexical else words[2]                   # "verb the COLOUR object number"
    return dataclasses.replace(u, text=" ".join(words), prosody=prosody if ambiguous else u.prosody,
                               prosody_of=other if ambiguous else u.prosody_of, emotion_word=word if lexical else None)


def make_corpus(root: str | Path, sizes: dict[str, int], seed: int = 0, out_of_domain: bool = False,
                condition: str = "prosody") -> Path:
    """Write a corpus in the MSP-Podcast release layout; `sizes` = utterances per Split_Set."""
    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            raise UserError(f"{tool}: not installed (make demo installs espeak-ng and sox; or apt-get install {tool})")
    root = Path(root)
    for sub in ("Audios", "Labels", "Transcripts"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    plan = plan_corpus(sizes, seed, out_of_domain, condition)
    consensus, detailed = [], []
    for u in plan:
        (root / "Transcripts" / u.name.replace(".wav", ".txt")).write_text(u.text + "\n")
        consensus.append({"FileName": u.name, "EmoClass": u.code, "EmoAct": 4.0, "EmoVal": 4.0, "EmoDom": 4.0,
                          "SpkrID": u.voice, "Gender": "Female" if "+f" in u.voice else "Male", "Split_Set": u.split})
        for worker, vote in enumerate(u.votes):
            detailed.append({"FileName": u.name, "WorkerID": f"annotator{worker}", "EmoClass_Major": LONG_NAMES[vote],
                             "EmoAct": 4, "EmoVal": 4, "EmoDom": 4})
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda u: _synthesise((u.text, u.voice, *u.prosody), root / "Audios" / u.name), plan))
    write_labels(root, consensus, detailed)
    return root


def write_labels(root: Path, consensus: list[dict], detailed: list[dict]) -> None:
    """`Labels/labels_consensus.csv` and `Labels/labels_detailed.csv` from one dict per row."""
    for path, rows in ((root / "Labels" / "labels_consensus.csv", consensus),
                       (root / "Labels" / "labels_detailed.csv", detailed)):
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
