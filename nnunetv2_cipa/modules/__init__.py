"""CIPA building blocks: selective-scan mixers, VMamba encoder, CRM, DCIM and the Mamba decoder."""
