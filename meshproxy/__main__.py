from meshproxy.cli import main

raise SystemExit(main())
