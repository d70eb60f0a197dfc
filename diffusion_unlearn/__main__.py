from diffusion_unlearn.cli import main

raise SystemExit(main())
