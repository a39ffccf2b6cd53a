from llmtune.cli.app import main

main()
