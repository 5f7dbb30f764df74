from stockflow.cli import main

if __name__ == "__main__":  # not when a rebuild's worker process (spawned) imports it again
    main()
