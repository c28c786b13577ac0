// Package recserveclient holds the Go client of recserve: stubs generated from
// proto/recserve/v1/*.proto into gen/recserve/v1 (package recservev1, not committed) and
// the example command cmd/recommend.
//
// The stubs are generated at build time, as the Python ones are: `make go-client` runs
// protoc (from grpcio-tools) with protoc-gen-go and protoc-gen-go-grpc at pinned
// versions, installed into build/go-bin. Import path:
//
//	import recservev1 "github.com/recserve/recserve/clients/go/gen/recserve/v1"
package recserveclient
