"""Fine-tune a released or locally saved trustser SER-SLM on a new emotion corpus with its own label set.

    accelerate launch --config_file recipes/accelerate_configs/cpu.yaml \
        recipes/finetune_new_corpus.py --config recipes/configs/finetune_new_corpus.yaml \
        --model path/or/hub-id --corpus_root my_corpus/

Stages (cached under <output_dir>/cache): annotate the corpus' descriptors -> the checkpoint with the
new label words as tokens -> CEM selection of the most reliable annotated captions -> fine-tuning with
RL rectification -> evaluation (<output_dir>/finetune-seed<seed>/results.json, report.md, plots).
Every setting of trustser.finetune.FinetuneConfig can be overridden on the command line.
"""

from trustser.finetune import main

if __name__ == "__main__":
    main()
