"""A small byte-level BPE tokenizer trained on a given text (no download): for tiny test and benchmark checkpoints."""
from __future__ import annotations


def bpe_tokenizer(text: str, vocab_size: int = 320):
    """A transformers PreTrainedTokenizerFast: byte-level BPE with `vocab_size` ids trained on `text`, special
    tokens <unk> (0), <s> (1, BOS), </s> (2, EOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
