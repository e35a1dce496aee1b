"""The typed owners the RL loop (``megappo.trainer``) calls by name.

    build            ``build_run(cfg) -> Run``: the process grid, ``Policies`` (actor, critic,
                     reference), the rollout side, the objective, the train state, the metrics
    rollout_side     ``RolloutSide``: ``sample(step)`` -> ``RolloutBatch``, ``evaluate()``,
                     ``sync_weights(actor)``; the engine, prompt cursor and reward of a replica
    rollout_stream   ``RolloutStream``: the step's batches in every ``rollout.mode`` (sync, or a
                     producer thread generating ahead under a staleness bound)
    rollout_metrics  a step's rollout metrics over all data-parallel ranks
    state            ``TrainState``: the parts a checkpoint saves and a resume restores
"""
