from fusionprof.cli import main

main()
