"""The launcher behind ``pretrain.sh`` and ``finetune.sh``: topology, preflight, DeepSpeed or torchrun, supervision.

    python -m llmtrain.launch ENTRY.py [config.yaml] [--key value ...]    # what the .sh wrappers exec

It reads the run config once (refusing a credential given as a flag or key, as the entry points
do: :mod:`llmtrain.config.secrets`), picks the topology from the environment (:mod:`llmtrain.topology`),
checks the output dir, writes ``<output_dir>/logs/launch-<time>-node<N>.sh`` (the command) and
``.log`` (the whole console), runs the preflight
(:mod:`llmtrain.tools.doctor`) in this process while the job starts (the ranks wait for its verdict
before ``main``), starts DeepSpeed's per-node launcher (one node), DeepSpeed's runner (``HOSTFILE``:
pdsh over ssh) or torchrun (``NNODES``),
and supervises it: restarts a crashed run while it makes progress, turns a SIGTERM, SIGINT or SIGHUP
into a stop that reaches every rank on every host (:mod:`llmtrain.supervision`), and reports a lost
node. Variables: ``NUM_GPUS``, ``CUDA_VISIBLE_DEVICES``, ``NPROC``, ``HOSTFILE``, ``NNODES``,
``NODE_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``, ``DS_CONFIG``, ``MAX_RESTARTS``, ``SKIP_DOCTOR``,
``PREEMPT_GRACE_S``, ``NODE_TIMEOUT_S``, ``DRY_RUN``, ``PYTHON``; ``docs/launching.md`` describes
them. Exit codes: 0, 2 (bad input), 3 (non-finite loss), 75 (stopped after saving: rerun to
resume), 130 (aborted by a second Ctrl-C), else the job's own code.
"""
