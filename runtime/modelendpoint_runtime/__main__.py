"""``python -m modelendpoint_runtime``: same as the ``modelendpoint-runtime`` script."""

# The guard matters: vLLM starts its engine-core process with spawn, which
# re-imports the main module; without it the child would start a server too.
if __name__ == "__main__":
    from modelendpoint_runtime.main import main

    main()
