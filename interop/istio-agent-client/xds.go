// The `xds` subcommand: a downstream ADS client standing in for Envoy on pilot-agent's local XDS socket.
//
// pilot-agent's XDS proxy (pkg/istio-agent/xds_proxy.go) dials istiod only when a downstream connects
// to ./etc/istio/proxy/XDS and forwards that stream upstream with the agent's own TLS (root from
// ./var/run/secrets/istio/root-cert.pem) and bearer token. With DISABLE_ENVOY=true nothing connects, so
// this client does what Envoy's bootstrap would: plaintext gRPC over the Unix socket, one
// StreamAggregatedResources stream, a first DiscoveryRequest with a sidecar node (id
// sidecar~IP~POD.NS~NS.svc.cluster.local plus the metadata istiod reads), then ACKs every response.
// A broken stream is logged and reopened after a second, as Envoy retries. Every response and
// error is one JSON line on stdout.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"runtime/debug"
	"syscall"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/structpb"
)

type xdsEvent struct {
	Event     string `json:"event"`
	TypeURL   string `json:"type_url,omitempty"`
	Version   string `json:"version,omitempty"`
	Resources int    `json:"resources,omitempty"`
	Stream    int    `json:"stream,omitempty"`
	Error     string `json:"error,omitempty"`
	Time      string `json:"time"`
}

func emitXDS(e xdsEvent) {
	e.Time = time.Now().UTC().Format(time.RFC3339Nano)
	line, _ := json.Marshal(e)
	fmt.Println(string(line))
}

func runXDS(args []string) {
	fs := flag.NewFlagSet("xds", flag.ExitOnError)
	uds := fs.String("uds", "etc/istio/proxy/XDS", "pilot-agent's XDS proxy socket (relative to the agent's working folder, as Envoy's bootstrap names it)")
	namespace := fs.String("pod-namespace", envOr("POD_NAMESPACE", "default"), "POD_NAMESPACE: node metadata NAMESPACE")
	pod := fs.String("pod-name", envOr("POD_NAME", "pod"), "POD_NAME: part of the node id")
	serviceAccount := fs.String("service-account", envOr("SERVICE_ACCOUNT", "default"), "SERVICE_ACCOUNT: node metadata SERVICE_ACCOUNT")
	clusterID := fs.String("cluster-id", envOr("ISTIO_META_CLUSTER_ID", "Kubernetes"), "ISTIO_META_CLUSTER_ID: node metadata CLUSTER_ID")
	ip := fs.String("ip", "127.0.0.1", "INSTANCE_IP: part of the node id")
	istioVersion := fs.String("istio-version", istioModuleVersion(),
		"node metadata ISTIO_VERSION, as the agent's bootstrap sends it (default: the istio.io/istio version this is built with)")
	typeURL := fs.String("type", "type.googleapis.com/envoy.config.cluster.v3.Cluster", "the resource type to subscribe to")
	_ = fs.Parse(args)

	meta, err := structpb.NewStruct(map[string]any{
		"NAMESPACE":       *namespace,
		"SERVICE_ACCOUNT": *serviceAccount,
		"CLUSTER_ID":      *clusterID,
		"NAME":            *pod,
		"INSTANCE_IPS":    *ip,
		"ISTIO_VERSION":   *istioVersion,
	})
	if err != nil {
		emitXDS(xdsEvent{Event: "fatal", Error: err.Error()})
		os.Exit(2)
	}
	node := &core.Node{
		Id:       fmt.Sprintf("sidecar~%s~%s.%s~%s.svc.cluster.local", *ip, *pod, *namespace, *namespace),
		Cluster:  *pod + "." + *namespace,
		Metadata: meta,
	}

	ctx, cancel := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer cancel()
	conn, err := grpc.NewClient("unix:"+*uds, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		emitXDS(xdsEvent{Event: "fatal", Error: err.Error()})
		os.Exit(2)
	}
	defer conn.Close()
	ads := discovery.NewAggregatedDiscoveryServiceClient(conn)
	for stream := 1; ctx.Err() == nil; stream++ {
		err := xdsStream(ctx, ads, node, *typeURL, stream)
		if ctx.Err() != nil {
			return
		}
		emitXDS(xdsEvent{Event: "xds-error", Stream: stream, Error: err.Error()})
		select {
		case <-ctx.Done():
			return
		case <-time.After(time.Second):
		}
	}
}

// xdsStream holds one ADS stream until it breaks: subscribe, then ACK each response.
func xdsStream(ctx context.Context, ads discovery.AggregatedDiscoveryServiceClient, node *core.Node, typeURL string, stream int) error {
	s, err := ads.StreamAggregatedResources(ctx)
	if err != nil {
		return err
	}
	if err := s.Send(&discovery.DiscoveryRequest{Node: node, TypeUrl: typeURL}); err != nil {
		return err
	}
	emitXDS(xdsEvent{Event: "xds-stream", Stream: stream, TypeURL: typeURL})
	for {
		resp, err := s.Recv()
		if err != nil {
			return err
		}
		emitXDS(xdsEvent{Event: "xds-response", Stream: stream, TypeURL: resp.TypeUrl,
			Version: resp.VersionInfo, Resources: len(resp.Resources)})
		ack := &discovery.DiscoveryRequest{TypeUrl: resp.TypeUrl, VersionInfo: resp.VersionInfo, ResponseNonce: resp.Nonce}
		if err := s.Send(ack); err != nil {
			return err
		}
	}
}

// istioModuleVersion is the istio.io/istio version in this binary's build info (the one pinned in
// interop/versions.env, which pilot-agent's bootstrap reports for itself).
func istioModuleVersion() string {
	if info, ok := debug.ReadBuildInfo(); ok {
		for _, dep := range info.Deps {
			if dep.Path == "istio.io/istio" {
				return dep.Version
			}
		}
	}
	return ""
}
