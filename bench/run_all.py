"""`make bench`: every benchmark in turn; paste the tables into bench/RESULTS.md."""

from bench import generation

if __name__ == "__main__":
    generation.main()
