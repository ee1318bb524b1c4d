"""Convert a checkpoint into megakv's TP-sharded format (see megakv.checkpoint.convert)."""
from megakv.checkpoint.convert import main

if __name__ == "__main__":
    main()
