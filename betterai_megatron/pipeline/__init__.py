"""The full pipeline in one command (``betterai pipeline``): built-in data -> tokenizer -> preprocessing -> pretrain
-> SFT -> GRPO -> evaluation, each stage in ``<run.dir>/<stage>/`` (:mod:`.stages`), run, skipped or resumed by
:mod:`.runner`, summarised by :mod:`.summary`."""
