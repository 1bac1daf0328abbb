"""mqb's Hydra plugins for sweeps: ``hydra/launcher=mqb_pool`` (:mod:`.pool_launcher`) and
``hydra/sweeper=mqb_grid`` (:mod:`.grid_sweeper`)."""
