"""mqb's Hydra launcher plugin: ``hydra/launcher=mqb_pool`` (:mod:`.pool_launcher`)."""
