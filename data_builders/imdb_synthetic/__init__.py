"""The paper's synthetic IMDb preference data (section 5.2, appendix F.1) as format-v1 rows.

A pool of items (a review prompt plus `responses_per_prompt` completions) comes from one of:

- `source.kind: hf` -- an HF dataset loaded with `datasets.load_dataset` (default: the paper's
  `insub/imdb_prefix20_forDPO_gpt2-large-imdb-FT_siebert_sentiment-roberta-large-english`,
  columns text / chosen / rejected; chosen/rejected there were picked by a sentiment model and
  are only used as the two completions, never as labels). `source.dataset` may be a local
  folder or data file (or a `save_to_disk` folder).
- `source.kind: file` -- a CSV / JSONL / parquet file with `source.prompt_column` plus
  `source.completion_columns`, or raw reviews in `source.review_column`: the prompt is the
  first `source.prompt_tokens` (20) whitespace tokens with markup such as `<br />` removed,
  and completions are sampled from `generator.model` (a local HF model folder, or `tiny` to
  build one with `emdpo_plugin.models.tiny.build_tiny_lm` from the reviews).
- `source.kind: generated` -- an offline corpus of review-like prompts and completions made
  from templates and word lists with controlled sentiment and seeded grammar errors (it is
  synthetic text, and the manifest says so under `source.synthetic`).

Then (paper F.1): `test_size` items with distinct prompts are held out for the test split and
`val_size` more (default: as many as test) for the validation split; each of `users`
annotators gets a group (exact counts from the `groups` fractions, e.g. 800 sentiment / 400
grammar), and `pairs_per_user` distinct items drawn uniformly from the training pool. The
`sentiment` group prefers the more positive completion (`sentiment.engine`, default VADER);
the `grammar` group the one with fewer grammar errors per character (`grammar.engine`,
default Harper). Every annotator of a group labels an item the same way (labels are a function
of the item). Every test prompt is labelled once by each group (annotator `test-<group>`), and
so is every val prompt (`val-<group>`). Train, val and test share no prompt (the manifest's
`disjoint_prompts` records this and loading checks it). Hyperparameters are chosen on val; the
test split is read only by the final report stage.
With `responses_per_prompt` >= 3 rows are full rankings, best first.

Choices made here (the paper leaves them open):

- Ties (equal scores under the group's criterion; e.g. two completions without grammar
  errors) are broken by the other group's criterion, then by a seeded coin per item
  (`tie_break: other_then_coin`; `coin` skips the first step). Tie counts are reported in the
  manifest under `ties`.
- The order of an item's responses is shuffled once per item with the seed, so index 0 is not
  the source's "chosen" column.
- Items with a blank completion, or whose completions are identical, carry no preference and
  are dropped; the counts are reported under `source.dropped`.
- Only items that some annotator (or the test split) uses are labelled, each distinct
  (prompt, completion) once.
- Grammar is checked on prompt + completion and only errors inside the completion count
  (a completion continues its prompt; `grammar.context`, default on except for the
  `generated` source whose completions are whole sentences); sentiment is scored on the
  completion alone.

Modules: `config` (the pydantic models), `sources` (hf / file / generated items), `corpus` (the
template review corpus), `item` (what a source yields) and `builder` (`build` and its steps).
"""

from .builder import build, group_counts, rank_with_ties
from .config import (
    DEFAULT_HF_DATASET,
    GROUPS,
    TIE_RULES,
    GeneratorConfig,
    GrammarConfig,
    ImdbConfig,
    SentimentConfig,
    SourceConfig,
    config_error,
)
from .corpus import ReviewCorpus
from .item import Item
from .sources import first_tokens, generate_completions

__all__ = [
    "DEFAULT_HF_DATASET", "GROUPS", "TIE_RULES", "GeneratorConfig", "GrammarConfig", "ImdbConfig", "Item",
    "ReviewCorpus", "SentimentConfig", "SourceConfig", "build", "config_error", "first_tokens",
    "generate_completions", "group_counts", "rank_with_ties",
]
