"""What can be done to models: each operation turns input catalogues into a write plan."""
