"""The config keys of seqexp's own model classes, without torch: the command line's check
(seqexp/apps/preflight.py) and `seqexp --help` read them through the registry of models
(seqexp/run/registry.py) before torch is imported, which the model modules need. Each class's
`config_keys` is its table here (`{constructor argument: Key}`, seqexp/models/base.py), so a
key is declared once; a plugin's class declares its table itself (docs/adding-a-model.md).

A choice among classes (the recurrent cells) names its list (`listed("cells")`, filled in by
seqexp/run/options.py from seqexp/models/cells.py); the other choices' options are here, and
the models take them from here.
"""

from __future__ import annotations

from collections.abc import Mapping

from seqexp.core.schema import Key, choice, flag, integer, listed, number

LOSSES = ("full_softmax", "sampled_softmax")
DREAM_POOLINGS = ("max", "mean")
DREAM_CELLS = ("rnn", "gru")
DECAY_UNITS = ("position", "time")

RECURRENT_KEYS: dict[str, Key] = {
    "hidden_size": Key(integer(1), "hidden units of the recurrent layer"),
    "window": Key(integer(1), "truncated-BPTT unfold: events per training window"),
    "dropout": Key(number(0.0, 1.0), "dropout of the recurrent output"),
    "dropout_is_keep_prob": Key(flag(), "read dropout as a keep probability (0.8 drops "
                                "0.2)"),
    "user_dropout": Key(number(0.0, 1.0), "dropout of the user vector (user-based cells)"),
    "loss": Key(choice(*LOSSES), "training loss"),
    "n_negatives": Key(integer(1), "shared negatives of the sampled softmax"),
    "sample_alpha": Key(number(0.0), "negatives sampled by popularity^sample_alpha"),
    # changes results by float rounding only (sums taken in another order), so it counts
    "softmax_block": Key(integer(1), "largest block of full-softmax logits (rows x items) "
                         "computed at once; more are computed in blocks (memory; another "
                         "value changes float rounding only)"),
    "eval_chunk": Key(integer(1), "time steps replayed per chunk at evaluation (memory)",
                      affects_results=False),
    "session_gap_s": Key(number(0.0, nullable=True), "a gap above this many seconds ends a "
                         "session and the state restarts from h0, in training and "
                         "evaluation (null = one state over the user's whole history)"),
    "cell": Key(listed("cells"), "the recurrent cell"),
    # rectified_ugru's cell
    "threshold": Key(choice("soft", "hard"), "rectified_ugru: sigmoid-relaxed or step "
                     "thresholds"),
    "temperature": Key(number(0.0, low_open=True), "rectified_ugru: temperature of the "
                       "soft thresholds"),
    "omega": Key(number(0.0, 1.0, nullable=True), "rectified_ugru: fixed omega (null = "
                 "learned)"),
}

# HRNN: the recurrent keys less the choice of cell (its cell is the hierarchical one)
HRNN_KEYS: dict[str, Key] = {
    key: entry for key, entry in RECURRENT_KEYS.items()
    if key not in ("cell", "threshold", "temperature", "omega")} | {
    "user_state_dropout": Key(number(0.0, 1.0), "hrnn: dropout of the session state "
                              "entering the user-level GRU"),
    "init_dropout": Key(number(0.0, 1.0), "hrnn: dropout of the session state projected "
                        "from the user-level state"),
}

SASREC_KEYS: dict[str, Key] = {
    "hidden_size": Key(integer(1), "size of the item, position and hidden vectors"),
    "max_len": Key(integer(1), "latest items a prediction attends to"),
    "n_blocks": Key(integer(1), "self-attention blocks"),
    "n_heads": Key(integer(1), "attention heads (must divide hidden_size)"),
    "dropout": Key(number(0.0, 1.0, high_open=True), "dropout of embeddings, attention "
                   "and feed-forward outputs"),
    "eval_points": Key(integer(1), "prediction points encoded at once at evaluation "
                       "(memory)", affects_results=False),
}

DREAM_KEYS: dict[str, Key] = {
    "hidden_size": Key(integer(1), "size of the item vectors and the hidden state"),
    "pooling": Key(choice(*DREAM_POOLINGS), "pooling of a basket's item vectors"),
    "cell": Key(choice(*DREAM_CELLS), "the recurrence"),
    "basket_gap_s": Key(number(0.0), "a gap above this many seconds starts a new basket"),
    "max_baskets": Key(integer(2, nullable=True), "baskets per training row (null = whole "
                       "histories)"),
    "init_std": Key(number(0.0, low_open=True), "std of the item vectors' initialisation"),
    "l2": Key(number(0.0), "L2 penalty (λ/2)·(‖X‖² + ‖R‖² + ‖N‖²) added to each batch's "
              "BPR loss, on DREAM's own parameters"),
}

ITEMKNN_KEYS: dict[str, Key] = {
    "neighbours": Key(integer(1), "neighbours kept per item"),
    "popularity_tiebreak": Key(flag(), "order items outside the neighbours by popularity"),
    "fit_block": Key(integer(1, nullable=True), "items per block of the similarity fit "
                     "(null = about 8M multiply-adds of its sparse product a block); a stop "
                     "signal is checked between blocks", affects_results=False),
}

EXPDECAY_KNN_KEYS: dict[str, Key] = ITEMKNN_KEYS | {
    "decay": Key(number(0.0), "lambda of exp(-lambda * distance)"),
    "decay_unit": Key(choice(*DECAY_UNITS), "distance in positions or in time"),
    "time_unit_s": Key(number(0.0, low_open=True), "seconds per time unit of the decay"),
    "window": Key(integer(1, nullable=True), "last events entering the sum (null = all)"),
    "anchor_block": Key(integer(1), "scattered entries per step (memory)",
                        affects_results=False),
}

FACTORISATION_KEYS: dict[str, Key] = {
    "factors": Key(integer(1), "latent factors"),
    "item_bias": Key(flag(), "a learned bias per item"),
    "init_std": Key(number(0.0, low_open=True), "std of the normal initialisation"),
    "l2": Key(number(0.0), "BPR's L2 penalty per sample"),
    "seen_bias": Key(flag(), "a learned offset for items in the user's history"),
}

SEQMF_KEYS: dict[str, Key] = FACTORISATION_KEYS | {
    "window": Key(integer(1), "last items whose transitions are averaged")}

POPULARITY_KEYS: dict[str, Key] = {}

# {class path (what a model file's `_target_` says): its config keys}: seqexp's own model
# classes, the ones the registry knows without importing them (a plugin's: its entry point).
SEQEXP_MODEL_CLASSES: dict[str, Mapping[str, Key]] = {
    "seqexp.models.recurrent.RecurrentRecommender": RECURRENT_KEYS,
    "seqexp.models.hrnn.HRNN": HRNN_KEYS,
    "seqexp.models.sasrec.SASRec": SASREC_KEYS,
    "seqexp.models.dream.DREAM": DREAM_KEYS,
    "seqexp.models.knn.ItemKNN": ITEMKNN_KEYS,
    "seqexp.models.knn.ExpDecayKNN": EXPDECAY_KNN_KEYS,
    "seqexp.models.factorisation.MF": FACTORISATION_KEYS,
    "seqexp.models.factorisation.SeqMF": SEQMF_KEYS,
    "seqexp.models.popularity.Popularity": POPULARITY_KEYS,
}
