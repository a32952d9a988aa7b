from comfy_orchestrator.cli import main

main()
